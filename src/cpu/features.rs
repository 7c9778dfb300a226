//! Which instruction-set family the CPU kernels run, chosen once at run time
//! from what the machine offers, and how to name both (the server's startup
//! log and `bench generate` report them: a speed ratio holds only for the
//! instruction set it was measured on).

use std::sync::OnceLock;

/// Whether the AVX2 family runs: AVX2, FMA and F16C, as every x86 core
/// since Haswell and Zen has.
pub fn avx2() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the AVX-512 kernels run (so far the Q8_0 dot product): AVX-512F
/// on top of the AVX2 family.
pub fn avx512() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            avx2() && std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the AVX-512BW kernels run (so far the Q4_K and Q6_K dot products).
pub fn avx512bw() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            avx512() && std::arch::is_x86_feature_detected!("avx512bw")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// The kernel family that runs: `avx2+fma` (with AVX-512 for the Q8_0,
/// Q4_K and Q6_K dot products where present) or `portable`.
pub fn kernels() -> &'static str {
    if avx512bw() {
        "avx2+fma, q8_0 avx512f, q4_K q6_K avx512bw"
    } else if avx512() {
        "avx2+fma, q8_0 avx512f"
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
        macro_rules! has {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    out.push($f);
                }
            )*};
        }
        has!("avx512f", "avx512bw", "avx512vnni", "avx512bf16", "avx2", "fma", "f16c");
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
