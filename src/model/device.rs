//! Which device a command computes on (`--device cpu|cuda[:N]`) and the
//! dtype that goes with it: f32 on the CPU (candle converts bf16 at every
//! CPU matmul otherwise), bf16 on CUDA GPUs; and how much host memory is free.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The host CPU.
    #[default]
    Cpu,
    /// CUDA GPU number N (`cuda` is `cuda:0`).
    Cuda(usize),
}

/// Why a device name was refused or a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The name is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device `{0}`: expected `cpu`, `cuda` or `cuda:N` (N = GPU index)")]
    Unknown(String),
    /// This binary was built without the `cuda` feature.
    #[error(
        "`--device {0}` needs a CUDA build of greencode; this one is CPU-only \
         (build with `--features cuda`, see deploy/build-cuda.sh)"
    )]
    NoCudaSupport(DeviceSpec),
    /// The CUDA driver or the GPU could not be opened.
    #[error("cannot open CUDA GPU {index}: {reason}")]
    CudaUnavailable {
        /// The GPU index asked for.
        index: usize,
        /// The driver's error.
        reason: String,
    },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_owned())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device (creates the CUDA context and cuBLAS handle on a GPU).
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(index) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(DeviceError::NoCudaSupport(self));
                }
                let device = Device::new_cuda(index).map_err(|e| DeviceError::CudaUnavailable {
                    index,
                    // candle appends a backtrace when RUST_BACKTRACE is set: keep the error line.
                    reason: e.to_string().lines().next().unwrap_or_default().to_owned(),
                })?;
                #[cfg(feature = "cuda")]
                if let Ok(d) = device.as_cuda_device() {
                    // SAFETY: candle works on one stream per thread, and the
                    // thread that builds a model is the only one that runs it
                    // (serve's engine thread owns it), so cudarc's per-tensor
                    // read/write events order nothing here; without them each
                    // allocation saves two event creations and destructions.
                    unsafe { d.disable_event_tracking() };
                }
                Ok(device)
            }
        }
    }

    /// The dtype models compute in on this device.
    pub fn dtype(self) -> DType {
        match self {
            Self::Cpu => DType::F32,
            Self::Cuda(_) => DType::BF16,
        }
    }

    /// The GPU index, when this is a GPU (the NVML meter reads the same one).
    pub fn gpu_index(self) -> Option<usize> {
        match self {
            Self::Cpu => None,
            Self::Cuda(i) => Some(i),
        }
    }
}

/// GPU memory in use on `device`'s GPU by every process (total − free, from
/// the driver), bytes; `None` on the CPU.
pub fn gpu_memory_used(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Ok(d) = device.as_cuda_device() {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some(total.saturating_sub(free) as u64);
    }
    let _ = device;
    None
}

/// Bytes of host memory free for new allocations (`MemAvailable` of
/// `/proc/meminfo`), when known.
pub fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.to_string().contains("expected `cpu`"), "{bad}: {e}");
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn dtype_follows_the_device() {
        assert_eq!(DeviceSpec::Cpu.dtype(), DType::F32);
        assert_eq!(DeviceSpec::Cuda(0).dtype(), DType::BF16);
    }

    #[test]
    fn the_cpu_has_no_gpu_memory() {
        assert_eq!(gpu_memory_used(&Device::Cpu), None);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_on_a_cpu_build_is_a_clear_error() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err();
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }
}
