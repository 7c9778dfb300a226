//! llama.cpp's block formats as greencode holds them: dequantization equal
//! bit for bit to the `gguf` package's (llama.cpp's reference in numpy),
//! and a model loaded from a GGUF file holding exactly the file's bytes.
//! The products of every form on every instruction-set path are in
//! `tests/kernel_paths.rs`.

mod common;

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use greencode::cpu::blocks::{BlockMatrix, BlockType};
use greencode::cpu::quant::Q8Matrix;
use greencode::generate::loaded::LoadedModel;

/// Columns of a test matrix for `ty`: a few blocks, an odd count of them.
fn width(ty: BlockType) -> usize {
    3 * ty.block_values() * if ty.block_values() == 32 { 3 } else { 1 }
}

#[test]
fn dequantization_equals_llama_cpps_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, seed) = (7, 1);
    let mut tensors = Vec::new();
    for ty in BlockType::ALL.iter().map(|t| t.ggml()).chain([GgmlDType::Q8_0]) {
        let cols = BlockType::of(ty).map_or(96, width);
        let w = Tensor::from_vec(common::weights(rows, cols, seed), (rows, cols), &Device::Cpu).unwrap();
        tensors.push((format!("{ty:?}"), QTensor::quantize(&w, ty).unwrap()));
    }
    let file = dir.path().join("blocks.gguf");
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    gguf_file::write(&mut std::fs::File::create(&file).unwrap(), &[], &refs).unwrap();
    let package = common::gguf_package_dequantize(&file);
    for (name, q) in &tensors {
        let (r, c) = q.shape().dims2().unwrap();
        let bytes = q.data().unwrap();
        let ours = match BlockType::of(q.dtype()) {
            Some(ty) => BlockMatrix::from_bytes(ty, r, c, &bytes).unwrap().dequantize(),
            None => Q8Matrix::from_ggml_bytes(r, c, &bytes).unwrap().dequantize(),
        };
        let theirs = &package[name];
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let differ = ours
            .iter()
            .zip(theirs)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ,
            0,
            "{name}: {differ} of {} values differ from llama.cpp's",
            ours.len()
        );
    }
}

/// tiny-coder exported by `greencode quantize --type ty` into `dir`.
fn export(dir: &Path, ty: &str) -> std::path::PathBuf {
    let file = dir.join(format!("tiny-{ty}.gguf"));
    let o = common::greencode(&[
        "quantize",
        "--model",
        common::tiny_coder().to_str().unwrap(),
        "--type",
        ty,
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    file
}

/// Bytes of every tensor of a GGUF file's (what a model holding them as
/// stored occupies).
fn tensor_bytes(content: &gguf_file::Content) -> usize {
    content
        .tensor_infos
        .values()
        .map(|t| t.shape.elem_count() * t.ggml_dtype.type_size() / t.ggml_dtype.block_size())
        .sum()
}

#[test]
fn a_model_from_a_gguf_file_holds_the_files_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let file = export(dir.path(), "q4_k");
    let p = LoadedModel::load_cpu(&file).unwrap();
    // Rows of 1,024 (down_proj) are Q4_K; rows of 384 fall back to Q5_0.
    assert_eq!(p.model.weight_format(), "mixed (q5_0, q4_K)");
    assert_eq!(p.model.quantization(), "q5_0");
    let mut f = std::fs::File::open(&file).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut file_bytes = |name: &str| {
        content
            .tensor(&mut f, name, &Device::Cpu)
            .unwrap()
            .data()
            .unwrap()
            .to_vec()
    };
    for (i, l) in p.model.layers.iter().enumerate() {
        let down = l.mlp.down_proj.blocks().expect("down_proj held in blocks");
        assert_eq!(down.block_type(), BlockType::Q4K);
        assert_eq!(down.as_bytes(), file_bytes(&format!("blk.{i}.ffn_down.weight")));
        let q = l.self_attn.q_proj.blocks().expect("q_proj held in blocks");
        assert_eq!(q.block_type(), BlockType::Q5_0);
        assert_eq!(q.as_bytes(), file_bytes(&format!("blk.{i}.attn_q.weight")));
    }
    // Every byte the model holds for its weights is a byte of the file's tensors.
    assert_eq!(p.model.weight_bytes(), tensor_bytes(&content));
    // And it generates: greedy text from the file agrees with the f32 model's
    // first tokens (4-5 bit weights keep the top choice on this prompt).
    let args = ["--prompt", "def fibonacci(n):\n", "--max-tokens", "4"];
    let from_file = common::generate_json(&file, &args);
    let from_folder = common::generate_json(&common::tiny_coder(), &args);
    assert_eq!(from_file["weights"], "mixed (q5_0, q4_K)");
    assert_eq!(from_file["token_ids"][0], from_folder["token_ids"][0]);
}

#[test]
fn an_f16_file_is_held_in_f16_with_the_bits_of_its_f32_values() {
    let dir = tempfile::tempdir().unwrap();
    let file = export(dir.path(), "f16");
    let held = LoadedModel::load_cpu(&file).unwrap();
    assert_eq!(held.model.weight_format(), "f16");
    let mut f = std::fs::File::open(&file).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(held.model.weight_bytes(), tensor_bytes(&content));
    let mut dense = LoadedModel::load_cpu(&file).unwrap();
    dense.model.hold_dense().unwrap();
    assert_eq!(dense.model.weight_format(), "f32");
    // A prompt (the tiled path), then decode steps (matrix × vector).
    let ids = held
        .tokenizer
        .encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
        .unwrap();
    let run = |m: &greencode::model::Qwen2| {
        let mut cache = m.new_cache(64).unwrap();
        let mut out = vec![common::bits(
            &m.forward_cached(&ids, &mut cache, greencode::model::LogitsFor::All)
                .unwrap(),
        )];
        for id in [5u32, 77, 300] {
            out.push(common::bits(
                &m.forward_cached(&[id], &mut cache, greencode::model::LogitsFor::Last)
                    .unwrap(),
            ));
        }
        out
    };
    assert!(
        run(&held.model) == run(&dense.model),
        "f16-held logits differ from the f32-held ones"
    );
}
