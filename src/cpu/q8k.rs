//! Activations quantized to Q8_K, the k-quants' dot-product partner: one
//! 256-value block at a time, exactly as candle's `BlockQ8K::from_float`
//! (ggml's `quantize_row_q8_K`: scale `−127 / max`, rounding half away from
//! zero, the sums of 16), vectorized where the machine allows. The decode
//! path (`blocks::BlockMatrix::quantize_input`) and the VNNI prompt path
//! (`gemm_vnni`) both quantize through here, so their rows are the same bits.

use candle_core::quantized::k_quants::{BlockQ8K, GgmlType};

/// Values a Q8_K block holds.
const QK: usize = 256;
/// Bytes of a Q8_K block: `d` (f32), 256 × i8, 16 × i16 sums.
const Q8K_BYTES: usize = 292;
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == Q8K_BYTES);

/// One 256-value block of `x` into `out`.
pub(crate) fn quantize_block(x: &[f32], out: &mut BlockQ8K) {
    #[cfg(target_arch = "x86_64")]
    if super::features::avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above); `x` holds 256
        // values (asserted inside) and `out` is one block.
        unsafe { avx512::quantize_block(x, out) };
        return;
    }
    BlockQ8K::from_float(&x[..QK], std::slice::from_mut(out));
}

/// `x` (a multiple of 256 values) into as many blocks.
pub(crate) fn quantize(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * QK);
    for (x, out) in x.chunks_exact(QK).zip(out) {
        quantize_block(x, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use candle_core::quantized::k_quants::BlockQ8K;

    use super::{Q8K_BYTES, QK};

    /// [`super::quantize_block`] on AVX-512F: the same arithmetic as
    /// candle's scalar loop (the first value of the largest magnitude sets
    /// the scale; `round` is emulated exactly, half away from zero).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize_block(x: &[f32], out: &mut BlockQ8K) {
        assert!(x.len() >= QK);
        let xp = x.as_ptr();
        let dst = out as *mut BlockQ8K as *mut u8;
        let mut vmax = _mm512_setzero_ps();
        for i in 0..16 {
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xp.add(16 * i))));
        }
        let amax = _mm512_reduce_max_ps(vmax);
        if amax == 0.0 {
            std::ptr::write_bytes(dst, 0, Q8K_BYTES);
            return;
        }
        let mut max = 0f32;
        for i in 0..16 {
            let hit =
                _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(_mm512_loadu_ps(xp.add(16 * i))), _mm512_set1_ps(amax));
            if hit != 0 {
                max = *xp.add(16 * i + hit.trailing_zeros() as usize);
                break;
            }
        }
        let iscale = -127f32 / max;
        let (scale, half, one) = (_mm512_set1_ps(iscale), _mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
        let sign = _mm512_set1_epi32(i32::MIN);
        for i in 0..16 {
            let v = _mm512_mul_ps(scale, _mm512_loadu_ps(xp.add(16 * i)));
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
            // v − t is exact; a fraction of at least one half rounds away.
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(v, t)), half);
            let step = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_and_si512(_mm512_castps_si512(v), sign),
                _mm512_castps_si512(one),
            ));
            let r = _mm512_mask_add_ps(t, away, t, step);
            let r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-128.0)), _mm512_set1_ps(127.0));
            let q = _mm512_cvttps_epi32(r);
            _mm_storeu_si128(dst.add(4 + 16 * i) as *mut __m128i, _mm512_cvtepi32_epi8(q));
            (dst.add(260 + 2 * i) as *mut i16).write_unaligned(_mm512_reduce_add_epi32(q) as i16);
        }
        (dst as *mut f32).write_unaligned(1.0 / iscale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: &[BlockQ8K]) -> &[u8] {
        // SAFETY: plain data, `repr(C)`.
        unsafe { std::slice::from_raw_parts(b.as_ptr() as *const u8, std::mem::size_of_val(b)) }
    }

    #[test]
    fn blocks_are_candles_bits() {
        let mut x: Vec<f32> = (0..5 * QK)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761);
                ((h >> 8) % 20_001) as f32 / 10_000.0 - 1.0
            })
            .collect();
        // Ties at the rounding point, repeated largest magnitudes of both
        // signs, an all-zero block.
        x[5] = 1.0;
        x[9] = -1.0;
        x[10] = 0.5 / 127.0;
        x[QK..2 * QK].fill(0.0);
        x[2 * QK + 3] = -1.5;
        x[2 * QK + 4] = 1.5;
        let mut ours = vec![BlockQ8K::zeros(); 5];
        quantize(&x, &mut ours);
        let mut theirs = vec![BlockQ8K::zeros(); 5];
        BlockQ8K::from_float(&x, &mut theirs);
        assert_eq!(bytes(&ours), bytes(&theirs));
    }
}
