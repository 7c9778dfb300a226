//! llama.cpp's reference quantizers, written out so a matrix quantized here
//! is byte for byte what `llama-quantize` writes (without an importance
//! matrix): Q4_0, Q5_0, Q5_1, Q8_0, and the k-quants Q4_K and Q5_K (a
//! weighted least-squares search over 21 and 16 scale candidates per
//! sub-block of 32, with a minimum) and Q6_K (an 19-candidate search per
//! sub-block of 16, no minimum).
//!
//! Each function follows ggml's `quantize_row_*_ref` operation by
//! operation, in the same order and in f32 (ggml builds that file without
//! FMA contraction or fast-math, and Rust never contracts), so the
//! roundings agree; `tests/llama_quantize.rs` checks the bytes against
//! files llama-quantize wrote. candle's quantizers differ for the k-quants
//! (Q4_K and Q5_K by an older, unweighted search; Q6_K by its
//! reconstruction), which is why they are not used for writing.
//!
//! Input is a flat run of f32 values, a whole number of blocks (a row-major
//! matrix whose rows are whole blocks quantizes the same row by row or at
//! once); output is the blocks' bytes as a GGUF file stores them.

use candle_core::quantized::GgmlDType;
use half::f16;

/// Values per k-quant super-block.
const QK_K: usize = 256;

/// Below this magnitude ggml treats a group as all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// The block types quantized here.
pub const TYPES: [GgmlDType; 7] = [
    GgmlDType::Q4_0,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// The blocks of `x` in `ty`, as a GGUF file stores them; `None` for a
/// type not in [`TYPES`].
///
/// Panics when `x` is not a whole number of `ty`'s blocks (callers check
/// widths first and say so in their own errors).
pub fn quantize(ty: GgmlDType, x: &[f32]) -> Option<Vec<u8>> {
    let quantize_block: fn(&[f32], &mut Vec<u8>) = match ty {
        GgmlDType::Q4_0 => q4_0,
        GgmlDType::Q5_0 => q5_0,
        GgmlDType::Q5_1 => q5_1,
        GgmlDType::Q8_0 => q8_0,
        GgmlDType::Q4K => q4k,
        GgmlDType::Q5K => q5k,
        GgmlDType::Q6K => q6k,
        _ => return None,
    };
    let block = ty.block_size();
    assert!(
        x.len().is_multiple_of(block),
        "{} values are not whole {ty:?} blocks",
        x.len()
    );
    let mut out = Vec::with_capacity(x.len() / block * ty.type_size());
    for b in x.chunks_exact(block) {
        quantize_block(b, &mut out);
    }
    Some(out)
}

/// ggml's `nearest_int`: round half to even through the float adder, for
/// magnitudes under 2²²; the same bits as ggml beyond.
fn nearest_int(v: f32) -> i32 {
    let shifted = v + 12_582_912.0;
    (shifted.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The f16 round trip a stored scale takes.
fn via_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// The value of largest magnitude (the first of equals), with its sign.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// The smallest and largest value, as ggml's ±FLT_MAX scan finds them.
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// 32 values: `d = max / -8`, nibbles `x/d + 8`.
fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    for j in 0..16 {
        let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let hi = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        out.push(lo | (hi << 4));
    }
}

/// The low nibbles and the fifth bits of 32 five-bit values (`qh`, `qs`).
fn push_five_bits(l: &[u8; 32], out: &mut Vec<u8>) {
    let mut qh = 0u32;
    for (j, &v) in l.iter().enumerate() {
        qh |= u32::from((v & 0x10) >> 4) << j;
    }
    out.extend_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        out.push((l[j] & 0x0f) | ((l[j + 16] & 0x0f) << 4));
    }
}

/// 32 values: `d = max / -16`, five bits `x/d + 16`.
fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    let mut l = [0u8; 32];
    for (q, &v) in l.iter_mut().zip(x) {
        *q = ((v * id + 16.5) as i8).min(31) as u8;
    }
    push_five_bits(&l, out);
}

/// 32 values: scale and minimum, five bits `(x - min)/d`.
fn q5_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    push_f16(out, min);
    let mut l = [0u8; 32];
    for (q, &v) in l.iter_mut().zip(x) {
        *q = ((v - min) * id + 0.5) as u8;
    }
    push_five_bits(&l, out);
}

/// 32 values: `d = absmax / 127`, bytes `round(x/d)`.
fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// ggml's `make_qkx2_quants`: levels `0..=nmax` with a scale and a
/// minimum for `x`, chosen among `nstep + 1` candidate scales by the
/// weighted squared error. Returns (scale, −minimum).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The 6-bit scales and minimums of eight sub-blocks packed into 12 bytes.
fn pack_scales_mins(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xf) | ((lm[j] & 0xf) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// Sub-block `j`'s 6-bit scale and minimum out of the packed 12 bytes.
fn scale_min(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The shared part of Q4_K and Q5_K: per sub-block of 32 a weighted search
/// (weights `rms + |x|`), then the scales quantized to 6 bits against the
/// super-block's f16 `d` and `dmin`, and the levels recomputed from the
/// stored scales. Returns (d, dmin, packed scales, levels).
fn k_scales_and_levels(x: &[f32], nmax: i32, rmin: f32, nstep: i32) -> (f32, f32, [u8; 12], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    let mut weights = [0f32; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (scale, min) = make_qkx2_quants(nmax, xs, &weights, &mut l[32 * j..32 * (j + 1)], rmin, 0.1, nstep);
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scales_mins(&ls, &lm);
    let (d, dmin) = (max_scale / 63.0, max_min / 63.0);
    let (d16, dmin16) = (via_f16(d), via_f16(dmin));
    for j in 0..8 {
        let (sc, m) = scale_min(j, &packed);
        let dj = d16 * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin16 * m as f32;
        for i in 32 * j..32 * (j + 1) {
            l[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, l)
}

/// 256 values: eight 4-bit sub-blocks with 6-bit scales and minimums.
fn q4k(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, scales, l) = k_scales_and_levels(x, 15, -1.0, 20);
    push_f16(out, d);
    push_f16(out, dmin);
    out.extend_from_slice(&scales);
    for j in (0..QK_K).step_by(64) {
        out.extend((0..32).map(|i| l[j + i] | (l[j + i + 32] << 4)));
    }
}

/// 256 values: eight 5-bit sub-blocks with 6-bit scales and minimums.
fn q5k(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, scales, l) = k_scales_and_levels(x, 31, -0.5, 15);
    push_f16(out, d);
    push_f16(out, dmin);
    out.extend_from_slice(&scales);
    let (mut qh, mut ql) = ([0u8; 32], [0u8; 128]);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (chunk, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * chunk + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
    out.extend_from_slice(&qh);
    out.extend_from_slice(&ql);
}

/// ggml's `make_qx_quants` with `rmse_type` 1 (weights `x²`): signed
/// levels `-nmax..nmax` (stored `+ nmax`) and the best of 19 scales.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let nmax_f = nmax as f32;
    let mut iscale = -nmax_f / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (q, &v) in l.iter_mut().zip(x) {
        let li = level(iscale, v);
        *q = (li + nmax) as i8;
        let w = v * v;
        sumlx += w * v * li as f32;
        suml2 += w * li as f32 * li as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax_f + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let li = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * li;
            suml2 += w * li * li;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (q, &v) in l.iter_mut().zip(x) {
                *q = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// 256 values: sixteen 6-bit sub-blocks with 8-bit signed scales.
fn q6k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(32, &x[16 * ib..16 * (ib + 1)], &mut l[16 * ib..16 * (ib + 1)]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend(std::iter::repeat_n(0u8, GgmlDType::Q6K.type_size()));
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = 1.0 / iscale;
    let mut sc = [0i8; 16];
    for (s, &scale) in sc.iter_mut().zip(&scales) {
        *s = nearest_int(iscale * scale).min(127) as i8;
    }
    let d16 = via_f16(d);
    for (j, &s) in sc.iter().enumerate() {
        let dj = d16 * s as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * (j + 1) {
            l[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for (half, j) in (0..QK_K).step_by(128).enumerate() {
        let (ql, qh) = (&mut ql[64 * half..], &mut qh[32 * half..]);
        for i in 0..32 {
            let q = |k: usize| l[j + i + 32 * k];
            ql[i] = (q(0) & 0xf) | ((q(2) & 0xf) << 4);
            ql[i + 32] = (q(1) & 0xf) | ((q(3) & 0xf) << 4);
            qh[i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    push_f16(out, d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.4), 0);
        assert_eq!(nearest_int(17.6), 18);
    }

    #[test]
    fn packed_scales_unpack_to_themselves() {
        let ls = [0, 63, 17, 32, 5, 63, 48, 1];
        let lm = [63, 0, 9, 40, 62, 33, 16, 2];
        let s = pack_scales_mins(&ls, &lm);
        for j in 0..8 {
            assert_eq!(scale_min(j, &s), (ls[j], lm[j]), "sub-block {j}");
        }
    }
}
