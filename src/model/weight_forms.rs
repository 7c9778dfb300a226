//! How a model's matrices are held: f32 or the compute dtype, bf16 values
//! of a bf16 checkpoint kept as bf16, or Q8_0 blocks after quantization;
//! switching between them, and what they occupy.

use candle_core::Tensor;

use super::error::Result;
use super::linear::Linear;
use super::qwen2::Qwen2;

impl Qwen2 {
    /// Quantizes every projection, the `lm_head` and the embeddings to
    /// Q8_0 in place (see [`Linear::quantize_q8`]), dropping the
    /// full-precision matrices as it goes; tied embeddings share the
    /// `lm_head`'s blocks, as in a Q8_0 GGUF. Returns how many matrices were
    /// quantized (rows that are not a multiple of 32 stay as they are).
    pub fn quantize_q8(&mut self) -> Result<usize> {
        self.change_matrices(Linear::quantize_q8)
    }

    /// Applies `change` to every matrix (layer projections, embeddings, an
    /// untied `lm_head`; a tied one shares the embeddings' result) and
    /// counts those it reports changed.
    fn change_matrices(&mut self, mut change: impl FnMut(&mut Linear) -> candle_core::Result<bool>) -> Result<usize> {
        let mut n = 0;
        for (_, _, lin) in self.projections_mut() {
            n += usize::from(change(lin)?);
        }
        n += usize::from(change(&mut self.embed_tokens)?);
        if self.config.tie_word_embeddings {
            self.lm_head = self.embed_tokens.clone();
        } else {
            n += usize::from(change(&mut self.lm_head)?);
        }
        Ok(n)
    }

    /// Bytes the weights occupy as held (quantized matrices count their blocks).
    pub fn weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = self.embed_tokens.weight_bytes() + dense(self.norm.weight());
        if !self.config.tie_word_embeddings {
            n += self.lm_head.weight_bytes();
        }
        for l in &self.layers {
            for lin in l.projections() {
                n += lin.weight_bytes() + lin.bias().map_or(0, dense);
            }
            n += dense(l.input_layernorm.weight()) + dense(l.post_attention_layernorm.weight());
        }
        n
    }

    /// The quantized format decode mostly runs on: the one holding the
    /// most matrix bytes among Q8_0 and llama.cpp's block formats (`q8_0`,
    /// `q4_K`, `q6_K`, …), `none` when no matrix is quantized.
    pub fn quantization(&self) -> &'static str {
        let mut bytes: Vec<(&'static str, usize)> = Vec::new();
        for lin in self.matrices() {
            let Some(name) = lin.compact().filter(|w| w.quantized()).map(|w| w.format()) else {
                continue;
            };
            match bytes.iter_mut().find(|(n, _)| *n == name) {
                Some((_, b)) => *b += lin.weight_bytes(),
                None => bytes.push((name, lin.weight_bytes())),
            }
        }
        bytes.iter().max_by_key(|(_, b)| *b).map_or("none", |(n, _)| n)
    }

    /// Where the model computes: the CPU kernel family and the machine's
    /// vector extensions (`CPU kernels avx2+fma (machine: …)`), or the device.
    pub fn kernels(&self) -> String {
        if self.device.is_cpu() {
            crate::cpu::features::describe()
        } else {
            format!("{:?}", self.device)
        }
    }

    /// Every matrix once: layer projections, then `lm_head` (the embeddings
    /// when tied).
    fn matrices(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| l.projections()).chain([&self.lm_head])
    }

    /// Holds every bf16- or f16-held matrix as an f32 tensor again (the
    /// layout a bf16 checkpoint had before [`Linear::compact_bf16`], an f16
    /// GGUF's before it was held as f16): the same values, twice the bytes;
    /// for comparisons of the layouts.
    pub fn hold_dense(&mut self) -> Result<()> {
        self.change_matrices(|lin| lin.hold_dense().map(|()| true))?;
        Ok(())
    }

    /// How the weights are held: `q8_0`, a block format (`q4_K`, …),
    /// `bf16` (exact values of a bf16 checkpoint) or the compute dtype
    /// (`f32`, `bf16`, `f16`); `mixed (…)` listing the forms in order of
    /// appearance when the matrices differ (a Q4_K_M file's Q4_K and Q6_K;
    /// some matrices of a checkpoint bf16-exact, others not).
    pub fn weight_format(&self) -> String {
        let form = |l: &Linear| match l.compact() {
            Some(w) => w.format().to_owned(),
            None => format!("{:?}", self.dtype).to_lowercase(),
        };
        let mut forms: Vec<String> = Vec::new();
        for f in self.matrices().map(form) {
            if !forms.contains(&f) {
                forms.push(f);
            }
        }
        match forms.len() {
            0 => String::new(),
            1 => forms.remove(0),
            _ => format!("mixed ({})", forms.join(", ")),
        }
    }
}
