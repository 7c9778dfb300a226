//! Which instruction-set family the CPU kernels run, chosen once at run time
//! from what the machine offers, and how to name both (the server's startup
//! log and `bench generate` report them: a speed ratio holds only for the
//! instruction set it was measured on).

/// Whether the CPU has every extension named (std caches the detection);
/// false off x86-64.
#[cfg(target_arch = "x86_64")]
macro_rules! has {
    ($($f:tt),+) => { true $(&& std::arch::is_x86_feature_detected!($f))+ };
}
#[cfg(not(target_arch = "x86_64"))]
macro_rules! has {
    ($($f:tt),+) => {
        false
    };
}

/// A kernel family, narrowest first: the most [`limit`] (or the
/// `GREENCODE_CPU_KERNELS` environment variable) lets the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust, no vector intrinsics of ours.
    Portable = 0,
    /// AVX2 + FMA + F16C.
    Avx2 = 1,
    /// AVX-512 (F, and BW where present) on top of AVX2.
    Avx512 = 2,
}

impl Level {
    /// Every level, narrowest first.
    pub const ALL: [Level; 3] = [Level::Portable, Level::Avx2, Level::Avx512];

    /// Its name in `GREENCODE_CPU_KERNELS` and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// Whether this machine has the instructions of the level.
    pub fn available(self) -> bool {
        match self {
            Self::Portable => true,
            Self::Avx2 => has!("avx2", "fma", "f16c"),
            Self::Avx512 => has!("avx2", "fma", "f16c", "avx512f"),
        }
    }
}

const UNSET: u8 = u8::MAX;
static CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNSET);

/// The widest level allowed: [`limit`]'s, else `GREENCODE_CPU_KERNELS`
/// (`portable`, `avx2`, `avx512`; read once), else no cap.
fn cap() -> u8 {
    use std::sync::atomic::Ordering::Relaxed;
    let c = CAP.load(Relaxed);
    if c != UNSET {
        return c;
    }
    let from_env = match std::env::var("GREENCODE_CPU_KERNELS") {
        Ok(v) => match Level::ALL.iter().find(|l| l.name() == v.trim()) {
            Some(l) => *l as u8,
            None => {
                eprintln!("greencode: warning: GREENCODE_CPU_KERNELS={v} is not portable, avx2 or avx512: ignored");
                Level::Avx512 as u8
            }
        },
        Err(_) => Level::Avx512 as u8,
    };
    let _ = CAP.compare_exchange(UNSET, from_env, Relaxed, Relaxed);
    CAP.load(Relaxed)
}

/// Caps the kernels at `level` for this process (to test or time a
/// narrower path on a wider machine); takes effect at the next product.
pub fn limit(level: Level) {
    CAP.store(level as u8, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the AVX2 family runs: AVX2, FMA and F16C, as every x86 core
/// since Haswell and Zen has (and not capped below it).
pub fn avx2() -> bool {
    cap() >= Level::Avx2 as u8 && Level::Avx2.available()
}

/// Whether the AVX-512F kernels run (so far the Q8_0 dot product): on top
/// of the AVX2 family.
pub fn avx512() -> bool {
    cap() >= Level::Avx512 as u8 && Level::Avx512.available()
}

/// Whether the AVX-512BW kernels run (so far the Q4_K and Q6_K dot products).
pub fn avx512bw() -> bool {
    avx512() && has!("avx512bw")
}

/// Whether the AVX-512 VNNI kernels run (prompt-sized Q4_K and Q6_K
/// products in 8-bit integers): on top of AVX-512BW.
pub fn avx512vnni() -> bool {
    avx512bw() && has!("avx512vnni")
}

/// The kernel family that runs: `avx2+fma` (with AVX-512 for the Q8_0,
/// Q4_K and Q6_K dot products and for prompt-sized products where
/// present) or `portable`.
pub fn kernels() -> &'static str {
    if avx512vnni() {
        "avx2+fma, q8_0 avx512f, q4_K q6_K avx512bw, prompts avx512f, q4_K q6_K prompts avx512vnni"
    } else if avx512bw() {
        "avx2+fma, q8_0 avx512f, q4_K q6_K avx512bw, prompts avx512f"
    } else if avx512() {
        "avx2+fma, q8_0 avx512f, prompts avx512f"
    } else if avx2() {
        "avx2+fma"
    } else {
        "portable"
    }
}

/// The vector extensions this machine offers that matter to the kernels
/// and to llama.cpp's (`avx512f avx512bw avx512vnni avx512bf16 avx2 fma f16c`, …).
pub fn machine() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut out = Vec::new();
        macro_rules! list {
            ($($f:tt),*) => {$(
                if has!($f) {
                    out.push($f);
                }
            )*};
        }
        list!("avx512f", "avx512bw", "avx512vnni", "avx512bf16", "avx2", "fma", "f16c");
        if out.is_empty() {
            "no AVX".to_owned()
        } else {
            out.join(" ")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_owned()
    }
}

/// One line for logs: the kernels that run and what the machine has.
pub fn describe() -> String {
    format!("CPU kernels {} (machine: {})", kernels(), machine())
}
