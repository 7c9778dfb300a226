//! Meters of cumulative energy. Each reports joules since it started and
//! names its source; none ever reports a silent zero: a meter that cannot
//! work fails to open with a reason, and `auto` moves on to the next.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Where energy figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnergySource {
    /// NVIDIA's total-energy counter (GPU board energy).
    Nvml,
    /// Intel/AMD RAPL package counters (CPU package energy).
    Rapl,
    /// A power model applied to the process's CPU time.
    Estimated,
    /// A scripted meter (tests).
    Fake,
}

impl EnergySource {
    /// The label used in responses and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nvml => "nvml",
            Self::Rapl => "rapl",
            Self::Estimated => "estimated",
            Self::Fake => "fake",
        }
    }
}

/// Why a meter could not be opened or read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct MeterError(pub String);

/// A source of cumulative energy.
pub trait Meter: Send {
    /// Where the figures come from.
    fn source(&self) -> EnergySource;
    /// Joules consumed since the meter was opened.
    fn joules(&mut self) -> Result<f64, MeterError>;
    /// GPU memory this process uses, bytes (None where there is no GPU).
    fn gpu_memory_bytes(&mut self) -> Option<u64> {
        None
    }
    /// A one-line description for the start-up log.
    fn describe(&self) -> String;
}

/// Which meter `--energy` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterChoice {
    /// The first that works: NVML, RAPL, estimated.
    Auto,
    /// NVML only.
    Nvml,
    /// RAPL only.
    Rapl,
    /// The estimate only.
    Estimated,
}

/// The power model of the estimated meter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerModel {
    /// Watts drawn whatever the process does (its share of an idle machine).
    pub idle_watts: f64,
    /// Watts per fully busy core (CPU seconds of this process).
    pub busy_watts_per_core: f64,
}

impl PowerModel {
    /// CodeCarbon's fallback without RAPL is the CPU's TDP (85 W when unknown);
    /// greencode spreads it over the machine's cores: a process keeping every
    /// core busy draws 85 W. Idle: 10% of that.
    pub fn default_for(cores: usize) -> Self {
        let cores = cores.max(1) as f64;
        Self {
            idle_watts: 8.5,
            busy_watts_per_core: 85.0 / cores,
        }
    }
}

/// Opens the meter `choice` asks for; `auto` logs why each skipped meter failed.
pub fn open_meter(choice: MeterChoice, model: PowerModel) -> Result<Box<dyn Meter>, MeterError> {
    match choice {
        MeterChoice::Nvml => Ok(Box::new(NvmlMeter::open()?)),
        MeterChoice::Rapl => Ok(Box::new(RaplMeter::open(Path::new("/sys/class/powercap"))?)),
        MeterChoice::Estimated => Ok(Box::new(EstimatedMeter::new(model)?)),
        MeterChoice::Auto => {
            let mut why = Vec::new();
            match NvmlMeter::open() {
                Ok(m) => return Ok(Box::new(m)),
                Err(e) => why.push(format!("nvml: {e}")),
            }
            match RaplMeter::open(Path::new("/sys/class/powercap")) {
                Ok(m) => return Ok(Box::new(m)),
                Err(e) => why.push(format!("rapl: {e}")),
            }
            let m = EstimatedMeter::new(model)?;
            eprintln!(
                "greencode: energy meter: the estimate below, as this machine offers no energy counter ({})",
                why.join("; ")
            );
            Ok(Box::new(m))
        }
    }
}

/// NVIDIA GPU energy from NVML's total-energy counter (Volta or newer).
pub struct NvmlMeter {
    nvml: nvml_wrapper::Nvml,
    index: u32,
    start_mj: u64,
    name: String,
}

impl NvmlMeter {
    /// Loads libnvidia-ml at run time; fails cleanly where no driver exists.
    pub fn open() -> Result<Self, MeterError> {
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| {
            MeterError(match e {
                // The usual case on a machine without an NVIDIA GPU, not a failure.
                nvml_wrapper::error::NvmlError::LibloadingError(_) => {
                    "NVML unavailable: no NVIDIA driver on this machine (libnvidia-ml.so.1 not found)".into()
                }
                e => format!("NVML unavailable: {e}"),
            })
        })?;
        let (start_mj, name) = {
            let dev = nvml
                .device_by_index(0)
                .map_err(|e| MeterError(format!("NVML: no GPU 0: {e}")))?;
            let e = dev
                .total_energy_consumption()
                .map_err(|e| MeterError(format!("NVML: no energy counter on this GPU: {e}")))?;
            (e, dev.name().unwrap_or_else(|_| "GPU".into()))
        };
        Ok(Self {
            nvml,
            index: 0,
            start_mj,
            name,
        })
    }
}

impl Meter for NvmlMeter {
    fn source(&self) -> EnergySource {
        EnergySource::Nvml
    }

    fn joules(&mut self) -> Result<f64, MeterError> {
        let dev = self
            .nvml
            .device_by_index(self.index)
            .map_err(|e| MeterError(format!("NVML: {e}")))?;
        let now = dev
            .total_energy_consumption()
            .map_err(|e| MeterError(format!("NVML: {e}")))?;
        Ok(now.saturating_sub(self.start_mj) as f64 / 1000.0)
    }

    fn gpu_memory_bytes(&mut self) -> Option<u64> {
        let dev = self.nvml.device_by_index(self.index).ok()?;
        let pid = std::process::id();
        let procs = dev.running_compute_processes().ok()?;
        procs.iter().find(|p| p.pid == pid).map(|p| match p.used_gpu_memory {
            nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => b,
            nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => 0,
        })
    }

    fn describe(&self) -> String {
        format!("NVML total-energy counter of GPU 0 ({})", self.name)
    }
}

/// CPU package energy from the Linux powercap RAPL counters, summed over packages.
pub struct RaplMeter {
    domains: Vec<RaplDomain>,
    total_uj: f64,
}

struct RaplDomain {
    energy: PathBuf,
    max_uj: u64,
    last_uj: u64,
}

impl RaplMeter {
    /// Opens every top-level package domain (`intel-rapl:N`) under `root`.
    pub fn open(root: &Path) -> Result<Self, MeterError> {
        let entries =
            std::fs::read_dir(root).map_err(|e| MeterError(format!("{} not readable: {e}", root.display())))?;
        let mut domains = Vec::new();
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            // Packages are `intel-rapl:N` (AMD kernels use the same name); `:N:M` are subdomains.
            if !name.starts_with("intel-rapl:") || name.matches(':').count() != 1 {
                continue;
            }
            let dir = e.path();
            let read = |f: &str| -> Result<u64, MeterError> {
                std::fs::read_to_string(dir.join(f))
                    .map_err(|e| MeterError(format!("{}: {e}", dir.join(f).display())))?
                    .trim()
                    .parse()
                    .map_err(|e| MeterError(format!("{}: {e}", dir.join(f).display())))
            };
            domains.push(RaplDomain {
                energy: dir.join("energy_uj"),
                max_uj: read("max_energy_range_uj")?,
                last_uj: read("energy_uj")?,
            });
        }
        if domains.is_empty() {
            return Err(MeterError(format!("no RAPL package domain under {}", root.display())));
        }
        Ok(Self { domains, total_uj: 0.0 })
    }
}

impl Meter for RaplMeter {
    fn source(&self) -> EnergySource {
        EnergySource::Rapl
    }

    fn joules(&mut self) -> Result<f64, MeterError> {
        for d in &mut self.domains {
            let now: u64 = std::fs::read_to_string(&d.energy)
                .map_err(|e| MeterError(format!("{}: {e}", d.energy.display())))?
                .trim()
                .parse()
                .map_err(|e| MeterError(format!("{}: {e}", d.energy.display())))?;
            // The counter wraps at max_energy_range_uj.
            let delta = if now >= d.last_uj {
                now - d.last_uj
            } else {
                d.max_uj - d.last_uj + now
            };
            d.last_uj = now;
            self.total_uj += delta as f64;
        }
        Ok(self.total_uj / 1e6)
    }

    fn describe(&self) -> String {
        format!("RAPL powercap counters ({} package domains)", self.domains.len())
    }
}

/// Energy estimated from a stated power model and the process's CPU time.
pub struct EstimatedMeter {
    model: PowerModel,
    start: Instant,
    start_cpu: f64,
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat.
pub fn process_cpu_seconds() -> Result<f64, MeterError> {
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(|e| MeterError(format!("/proc/self/stat: {e}")))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let parse = |i: usize| -> Result<f64, MeterError> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| MeterError("/proc/self/stat: unexpected format".into()))
    };
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the name.
    let ticks = parse(11)? + parse(12)?;
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks / if hz > 0 { hz as f64 } else { 100.0 })
}

impl EstimatedMeter {
    /// Starts the estimate now.
    pub fn new(model: PowerModel) -> Result<Self, MeterError> {
        Ok(Self {
            model,
            start: Instant::now(),
            start_cpu: process_cpu_seconds()?,
        })
    }
}

impl Meter for EstimatedMeter {
    fn source(&self) -> EnergySource {
        EnergySource::Estimated
    }

    fn joules(&mut self) -> Result<f64, MeterError> {
        let wall = self.start.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds()? - self.start_cpu;
        Ok(self.model.idle_watts * wall + self.model.busy_watts_per_core * cpu.max(0.0))
    }

    fn describe(&self) -> String {
        format!(
            "estimated: {:.1} W idle + {:.1} W per busy core (process CPU time from /proc)",
            self.model.idle_watts, self.model.busy_watts_per_core
        )
    }
}

/// A meter whose reading tests set by hand.
#[derive(Clone, Default)]
pub struct FakeMeter {
    /// The cumulative joules it reports.
    pub joules: Arc<Mutex<f64>>,
}

impl Meter for FakeMeter {
    fn source(&self) -> EnergySource {
        EnergySource::Fake
    }

    fn joules(&mut self) -> Result<f64, MeterError> {
        Ok(*self.joules.lock().expect("fake meter lock"))
    }

    fn describe(&self) -> String {
        "fake meter (tests)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rapl_handles_wraparound() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("intel-rapl:0");
        std::fs::create_dir(&d).unwrap();
        std::fs::create_dir(root.path().join("intel-rapl:0:0")).unwrap();
        std::fs::write(d.join("max_energy_range_uj"), "1000000\n").unwrap();
        std::fs::write(d.join("energy_uj"), "900000\n").unwrap();
        let mut m = RaplMeter::open(root.path()).unwrap();
        std::fs::write(d.join("energy_uj"), "950000\n").unwrap();
        assert!((m.joules().unwrap() - 0.05).abs() < 1e-9);
        std::fs::write(d.join("energy_uj"), "100000\n").unwrap(); // wrapped
        assert!((m.joules().unwrap() - 0.2).abs() < 1e-9);
    }

    #[test]
    fn rapl_absent_is_an_error_not_zero() {
        let root = tempfile::tempdir().unwrap();
        assert!(RaplMeter::open(root.path()).is_err());
        assert!(RaplMeter::open(Path::new("/nonexistent/powercap")).is_err());
    }

    #[test]
    fn estimate_grows_with_cpu_time() {
        let mut m = EstimatedMeter::new(PowerModel {
            idle_watts: 0.0,
            busy_watts_per_core: 100.0,
        })
        .unwrap();
        let cpu0 = process_cpu_seconds().unwrap();
        // Spin until this process has used 0.2 s of CPU (not of wall time:
        // on a loaded machine the thread may wait for a core).
        let mut x = 0u64;
        while process_cpu_seconds().unwrap() - cpu0 < 0.2 {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
        let j = m.joules().unwrap();
        let used = process_cpu_seconds().unwrap() - cpu0;
        // 100 W per busy core: joules follow CPU seconds (other test threads
        // of this process count too; /proc ticks are 10 ms).
        assert!(
            j >= 100.0 * 0.19 && j <= 100.0 * (used + 0.02),
            "{j} J for {used} CPU s"
        );
    }
}
