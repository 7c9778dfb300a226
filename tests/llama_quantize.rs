//! Against files llama.cpp's own `llama-quantize` wrote (the fixture in
//! `tests/fixtures/llama-quantize/`, made once by its `make_fixture.py`):
//! greencode quantizes the same f32 values to the same bytes for every
//! block type (Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; rows of 256 and of
//! 288, which take the fallbacks), `greencode quantize`'s Q4_K_M and Q5_K_M
//! mixes give each tensor llama-quantize's type, and greencode's reading of
//! the blocks equals the `gguf` package's dequantization bit for bit.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};
use greencode::cpu::block_quantize;
use greencode::cpu::blocks::{BlockMatrix, BlockType};
use greencode::cpu::quant::Q8Matrix;
use greencode::output::gguf::WeightType;

const LAYERS: usize = 2;

fn fixture(mix: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/llama-quantize/fixture-{mix}.gguf"))
}

fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The values `make_fixture.py`'s `values` gives the tensor `name`: the
/// same splitmix64 stream, integers scaled by powers of two (exact in f32).
fn values(name: &str, rows: usize, cols: usize) -> Vec<f32> {
    let mut state = fnv1a(name);
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..rows * cols)
        .map(|i| {
            let (a, b) = ((next() >> 41) as i64, (next() >> 41) as i64);
            let mut v = (a + b - (1 << 23)) as f32 * (-(5.0 + ((i / cols) % 3) as f32) - 23.0).exp2();
            if i % 101 == 0 {
                v *= 8.0;
            }
            if (i / 256) % 23 == 7 {
                v = 0.0;
            }
            v
        })
        .collect()
}

/// (name, rows, cols, type, bytes) of every tensor in a fixture file.
fn tensors(path: &Path) -> Vec<(String, usize, usize, GgmlDType, Vec<u8>)> {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut out = Vec::new();
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let (rows, cols) = if dims.len() == 2 {
            (dims[0], dims[1])
        } else {
            (1, dims[0])
        };
        let q = content.tensor(&mut file, name, &candle_core::Device::Cpu).unwrap();
        out.push((
            name.clone(),
            rows,
            cols,
            info.ggml_dtype,
            q.data().unwrap().into_owned(),
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn greencode_quantizes_to_llama_quantizes_bytes() {
    let mut seen = std::collections::BTreeSet::new();
    for mix in ["q4_k_m", "q5_k_m", "q4_0"] {
        for (name, rows, cols, ty, bytes) in tensors(&fixture(mix)) {
            let v = values(&name, rows, cols);
            if ty == GgmlDType::F32 {
                // Vectors stay f32 (norm scales and biases): they check that
                // this file's generator is the fixture's.
                let want: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                assert!(
                    bytes == want,
                    "{mix}: {name}: the f32 values differ from the generator's"
                );
                continue;
            }
            let ours = block_quantize::quantize(ty, &v).unwrap_or_else(|| panic!("{name}: {ty:?} not quantized"));
            assert_eq!(ours.len(), bytes.len(), "{mix}: {name} ({ty:?})");
            let blocks = ty.type_size();
            let differ = ours
                .chunks(blocks)
                .zip(bytes.chunks(blocks))
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                differ,
                0,
                "{mix}: {name} ({ty:?}, [{rows}, {cols}]): {differ} of {} blocks differ from llama-quantize's",
                bytes.len() / blocks
            );
            seen.insert(format!("{ty:?}"));
        }
    }
    let all: std::collections::BTreeSet<String> = block_quantize::TYPES.iter().map(|t| format!("{t:?}")).collect();
    assert_eq!(seen, all, "the fixture holds every block type");
}

#[test]
fn the_k_quant_mixes_choose_llama_quantizes_types() {
    for (mix, ty) in [("q4_k_m", WeightType::Q4KM), ("q5_k_m", WeightType::Q5KM)] {
        for (name, rows, cols, stored, _) in tensors(&fixture(mix)) {
            if rows == 1 {
                continue;
            }
            assert_eq!(ty.stored_type(&name, cols, LAYERS, false), stored, "{mix}: {name}");
        }
    }
}

#[test]
fn greencode_reads_the_fixture_as_the_gguf_package_does() {
    for mix in ["q4_k_m", "q5_k_m", "q4_0"] {
        let file = fixture(mix);
        let package = common::gguf_package_dequantize(&file);
        for (name, rows, cols, ty, bytes) in tensors(&file) {
            let ours = match (BlockType::of(ty), ty) {
                (Some(b), _) => BlockMatrix::from_bytes(b, rows, cols, &bytes).unwrap().dequantize(),
                (None, GgmlDType::Q8_0) => Q8Matrix::from_ggml_bytes(rows, cols, &bytes).unwrap().dequantize(),
                _ => continue,
            };
            let theirs: Vec<u32> = package[&name].iter().map(|v| v.to_bits()).collect();
            let ours: Vec<u32> = ours.iter().map(|v| v.to_bits()).collect();
            assert!(
                ours == theirs,
                "{mix}: {name} ({ty:?}) differs from the gguf package's dequantization"
            );
        }
    }
}
