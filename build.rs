//! Compiles the CUDA kernels in `kernels/` to PTX with nvcc, only for
//! `--features cuda`; the default CPU build needs no CUDA toolkit.
//! The PTX lands in OUT_DIR and is embedded with `include_str!`; the driver
//! compiles it for the GPU at first use.

use std::path::PathBuf;
use std::process::Command;

/// Kernel sources, each compiled to `<name>.ptx`.
const KERNELS: [&str; 1] = ["decode_attention"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // PTX for the GPU generation asked for (90: Hopper), forward-compatible
    // with newer GPUs through the driver's JIT; 80 (Ampere) when unset.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for name in KERNELS {
        let src = format!("kernels/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                "-std=c++17",
                &format!("-arch=compute_{cap}"),
                &src,
                "-o",
            ])
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!("--features cuda needs nvcc ({nvcc}: {e}); deploy/build-cuda.sh installs it from PyPI")
            });
        assert!(status.success(), "nvcc failed on {src}");
    }
}
