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

/// Whether the AVX2 family runs: AVX2, FMA and F16C, as every x86 core
/// since Haswell and Zen has.
pub fn avx2() -> bool {
    has!("avx2", "fma", "f16c")
}

/// Whether the AVX-512F kernels run (so far the Q8_0 dot product): on top
/// of the AVX2 family.
pub fn avx512() -> bool {
    has!("avx2", "fma", "f16c", "avx512f")
}

/// Whether the AVX-512BW kernels run (so far the Q4_K and Q6_K dot products).
pub fn avx512bw() -> bool {
    has!("avx2", "fma", "f16c", "avx512f", "avx512bw")
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
