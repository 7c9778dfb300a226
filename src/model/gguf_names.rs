//! Tensor names in Hugging Face checkpoints and in llama.cpp's GGUF files,
//! one table read in both directions (export and import).

/// Whole-model tensors: (Hugging Face, GGUF).
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Per-layer tensors, without the layer prefix and `.weight`/`.bias`: (Hugging Face, GGUF).
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

/// GGUF name of a Hugging Face Qwen2 tensor.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = MODEL_TENSORS.iter().find(|(h, _)| *h == hf) {
        return Some((*g).to_owned());
    }
    let (layer, tail) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (part, kind) = tail.rsplit_once('.')?;
    let (_, g) = LAYER_TENSORS.iter().find(|(h, _)| *h == part)?;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Hugging Face name of a GGUF tensor.
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((h, _)) = MODEL_TENSORS.iter().find(|(_, g)| *g == gguf) {
        return Some((*h).to_owned());
    }
    let (layer, tail) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let (part, kind) = tail.rsplit_once('.')?;
    let (h, _) = LAYER_TENSORS.iter().find(|(_, g)| *g == part)?;
    Some(format!("model.layers.{layer}.{h}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp_both_ways() {
        for (hf, gguf) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.layers.3.self_attn.q_proj.bias", "blk.3.attn_q.bias"),
            ("model.layers.11.mlp.down_proj.weight", "blk.11.ffn_down.weight"),
            (
                "model.layers.0.post_attention_layernorm.weight",
                "blk.0.ffn_norm.weight",
            ),
            ("lm_head.weight", "output.weight"),
        ] {
            assert_eq!(gguf_name(hf).as_deref(), Some(gguf));
            assert_eq!(hf_name(gguf).as_deref(), Some(hf));
        }
        assert!(gguf_name("model.layers.0.mystery.weight").is_none());
        assert!(hf_name("blk.0.mystery.weight").is_none());
    }
}
