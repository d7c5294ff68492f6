//! Scalar reference dequantizers and simple quantizers for every supported ggml block type.
//!
//! Layouts follow llama.cpp's `ggml-common.h` byte for byte (all fields little-endian):
//!
//! | type | bytes | layout |
//! |------|-------|--------|
//! | Q4_0 | 18  | `f16 d; u8 qs[16]` (low nibbles = elements 0..16, high = 16..32, value `q - 8`) |
//! | Q5_0 | 22  | `f16 d; u8 qh[4]; u8 qs[16]` (bit k of `qh` is bit 4 of element k, value `q - 16`) |
//! | Q8_0 | 34  | `f16 d; i8 qs[32]` |
//! | Q4_K | 144 | `f16 d; f16 dmin; u8 scales[12]; u8 qs[128]` (8 sub-blocks of 32, 6-bit scale/min) |
//! | Q5_K | 176 | `f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]` |
//! | Q6_K | 210 | `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d` (16 sub-blocks of 16, value `q - 32`) |
//!
//! The quantizers are deliberately simple (no error-minimising search as in llama.cpp): they
//! exist so tests can write valid, reasonably accurate model files.

use half::{bf16, f16};

use super::{GgmlDType, QuantError};

/// Bytes of one Q4_0 block.
pub const Q4_0_BYTES: usize = 18;
/// Bytes of one Q5_0 block.
pub const Q5_0_BYTES: usize = 22;
/// Bytes of one Q8_0 block.
pub const Q8_0_BYTES: usize = 34;
/// Bytes of one Q4_K block.
pub const Q4_K_BYTES: usize = 144;
/// Bytes of one Q5_K block.
pub const Q5_K_BYTES: usize = 176;
/// Bytes of one Q6_K block.
pub const Q6_K_BYTES: usize = 210;
/// Elements per k-quant super-block.
pub const QK_K: usize = 256;

/// Reads a little-endian f16 at byte offset `i` and widens it.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Unpacks the 12-byte scale field of Q4_K/Q5_K into 8 six-bit scales and 8 six-bit mins
/// (llama.cpp's `get_scale_min_k4` for j = 0..8).
#[inline(always)]
pub(crate) fn k_scales_mins(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = q[j] & 63;
            mn[j] = q[j + 4] & 63;
        } else {
            sc[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
            mn[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// Packs 8 six-bit scales and mins into the 12-byte Q4_K/Q5_K scale field (inverse of
/// [`k_scales_mins`]).
fn pack_k_scales(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            q[j] = sc[j];
            q[j + 4] = mn[j];
        } else {
            q[j + 4] = (sc[j] & 0xF) | ((mn[j] & 0xF) << 4);
            q[j - 4] |= (sc[j] >> 4) << 6;
            q[j] |= (mn[j] >> 4) << 6;
        }
    }
    q
}

/// llama.cpp's `nearest_int`: round half to even via the 1.5·2^23 trick (exact for |x| < 2^22,
/// and cheap without SSE4.1's `roundps`).
#[inline(always)]
pub(crate) fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Checks that `n` elements of `dtype` are supported and whole blocks.
fn check_elems(dtype: GgmlDType, n: usize) -> Result<usize, QuantError> {
    if !super::is_supported(dtype) {
        return Err(QuantError::Unsupported(dtype));
    }
    dtype.bytes_for(n).ok_or(QuantError::NotBlockMultiple { dtype, len: n, block: dtype.block_size() })
}

/// Decodes `bytes` (whole blocks of `dtype`) into `out`, whose length is the element count.
///
/// The scalar reference decoder: used for embedding lookups, by tests as ground truth, and
/// for any weight layout the fast kernels do not read directly.
pub fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let expected = check_elems(dtype, out.len())?;
    if bytes.len() != expected {
        return Err(QuantError::ByteLength { dtype, elems: out.len(), expected, got: bytes.len() });
    }
    let ts = dtype.type_size();
    let bs = dtype.block_size();
    match dtype {
        GgmlDType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlDType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlDType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        _ => {
            let f: fn(&[u8], &mut [f32]) = match dtype {
                GgmlDType::Q4_0 => dequant_q4_0,
                GgmlDType::Q5_0 => dequant_q5_0,
                GgmlDType::Q8_0 => dequant_q8_0,
                GgmlDType::Q4_K => dequant_q4_k,
                GgmlDType::Q5_K => dequant_q5_k,
                GgmlDType::Q6_K => dequant_q6_k,
                _ => unreachable!("check_elems rejected unsupported {dtype}"),
            };
            for (b, o) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
                f(b, o);
            }
        }
    }
    Ok(())
}

fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((qs[j] & 0xF) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = k_scales_mins(&b[4..16]);
    let qs = &b[16..144];
    for c in 0..4 {
        let (d1, m1) = (d * sc[2 * c] as f32, dmin * mn[2 * c] as f32);
        let (d2, m2) = (d * sc[2 * c + 1] as f32, dmin * mn[2 * c + 1] as f32);
        let q = &qs[32 * c..32 * c + 32];
        for l in 0..32 {
            y[64 * c + l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[64 * c + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = k_scales_mins(&b[4..16]);
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        let (d1, m1) = (d * sc[2 * c] as f32, dmin * mn[2 * c] as f32);
        let (d2, m2) = (d * sc[2 * c + 1] as f32, dmin * mn[2 * c + 1] as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let q = &qs[32 * c..32 * c + 32];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * c + l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
            y[64 * c + 32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Encodes `x` (whole blocks of `dtype`) into ggml blocks.
///
/// Simple min/max quantizers, not llama.cpp's error-minimising search: tests use them to
/// write small random-weight GGUF files, so they must be valid and accurate, not optimal.
pub fn quantize(dtype: GgmlDType, x: &[f32]) -> Result<Vec<u8>, QuantError> {
    let nbytes = check_elems(dtype, x.len())?;
    let mut out = Vec::with_capacity(nbytes);
    match dtype {
        GgmlDType::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlDType::F16 => x.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlDType::BF16 => x.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        _ => {
            let f: fn(&[f32], &mut Vec<u8>) = match dtype {
                GgmlDType::Q4_0 => quant_q4_0,
                GgmlDType::Q5_0 => quant_q5_0,
                GgmlDType::Q8_0 => quant_q8_0,
                GgmlDType::Q4_K => quant_q4_k,
                GgmlDType::Q5_K => quant_q5_k,
                GgmlDType::Q6_K => quant_q6_k,
                _ => unreachable!("check_elems rejected unsupported {dtype}"),
            };
            x.chunks_exact(dtype.block_size()).for_each(|blk| f(blk, &mut out));
        }
    }
    debug_assert_eq!(out.len(), nbytes);
    Ok(out)
}

/// The element of largest magnitude, with its sign (0 for an all-zero block).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    max
}

fn quant_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let max = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    for j in 0..16 {
        let x0 = ((x[j] * id + 8.5) as i32).clamp(0, 15) as u8;
        let x1 = ((x[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
        out.push(x0 | (x1 << 4));
    }
}

fn quant_q5_0(x: &[f32], out: &mut Vec<u8>) {
    let max = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qh = 0u32;
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let x0 = ((x[j] * id + 16.5) as i32).clamp(0, 31) as u32;
        let x1 = ((x[j + 16] * id + 16.5) as i32).clamp(0, 31) as u32;
        qs[j] = ((x0 & 0xF) | ((x1 & 0xF) << 4)) as u8;
        qh |= ((x0 & 0x10) >> 4) << j;
        qh |= ((x1 & 0x10) >> 4) << (j + 16);
    }
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend_from_slice(&qs);
}

fn quant_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// Shared scale/min search of Q4_K and Q5_K: per 32-element sub-block an affine map
/// `x ≈ d·sc·q − dmin·mn` with `q` in `0..=qmax`; returns (d, dmin, scales, mins, q levels).
#[allow(clippy::type_complexity)]
fn quant_k_affine(x: &[f32], qmax: i32) -> (f16, f16, [u8; 8], [u8; 8], [u8; QK_K]) {
    let mut scale = [0f32; 8];
    let mut minv = [0f32; 8];
    for (s, sub) in x.chunks_exact(32).enumerate() {
        let lo = sub.iter().fold(f32::INFINITY, |m, &v| m.min(v)).min(0.0);
        let hi = sub.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        scale[s] = (hi - lo) / qmax as f32;
        minv[s] = -lo;
    }
    let max_scale = scale.iter().fold(0f32, |m, &v| m.max(v));
    let max_min = minv.iter().fold(0f32, |m, &v| m.max(v));
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    let inv_s = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_m = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    for s in 0..8 {
        // Round scales up so the largest level still covers the sub-block's maximum.
        sc[s] = ((inv_s * scale[s]).ceil() as i32).clamp(0, 63) as u8;
        mn[s] = nearest_int(inv_m * minv[s]).clamp(0, 63) as u8;
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    let mut levels = [0u8; QK_K];
    for (s, sub) in x.chunks_exact(32).enumerate() {
        let d1 = d.to_f32() * sc[s] as f32;
        let m1 = dmin.to_f32() * mn[s] as f32;
        let id = if d1 > 0.0 { 1.0 / d1 } else { 0.0 };
        for (l, &v) in sub.iter().enumerate() {
            levels[32 * s + l] = nearest_int((v + m1) * id).clamp(0, qmax) as u8;
        }
    }
    (d, dmin, sc, mn, levels)
}

fn quant_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, sc, mn, lv) = quant_k_affine(x, 15);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&pack_k_scales(&sc, &mn));
    for c in 0..4 {
        for l in 0..32 {
            out.push(lv[64 * c + l] | (lv[64 * c + 32 + l] << 4));
        }
    }
}

fn quant_q5_k(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, sc, mn, lv) = quant_k_affine(x, 31);
    let mut qh = [0u8; 32];
    let mut qs = [0u8; 128];
    for c in 0..4 {
        for l in 0..32 {
            let (l1, l2) = (lv[64 * c + l], lv[64 * c + 32 + l]);
            qh[l] |= ((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1));
            qs[32 * c + l] = (l1 & 0xF) | ((l2 & 0xF) << 4);
        }
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&pack_k_scales(&sc, &mn));
    out.extend_from_slice(&qh);
    out.extend_from_slice(&qs);
}

fn quant_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut scale = [0f32; 16];
    for (s, sub) in x.chunks_exact(16).enumerate() {
        scale[s] = signed_absmax(sub) / -32.0;
    }
    let max_scale = signed_absmax(&scale);
    let mut scales = [0i8; 16];
    let mut d = f16::ZERO;
    if max_scale != 0.0 {
        let iscale = -128.0 / max_scale;
        for s in 0..16 {
            scales[s] = nearest_int(iscale * scale[s]).clamp(-128, 127) as i8;
        }
        d = f16::from_f32(1.0 / iscale);
    }
    let mut lv = [32u8; QK_K];
    for (s, sub) in x.chunks_exact(16).enumerate() {
        let ds = d.to_f32() * scales[s] as f32;
        if ds == 0.0 {
            continue;
        }
        for (l, &v) in sub.iter().enumerate() {
            lv[16 * s + l] = (nearest_int(v / ds).clamp(-32, 31) + 32) as u8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for h in 0..2 {
        let (j, ql, qh) = (128 * h, &mut ql[64 * h..64 * h + 64], &mut qh[32 * h..32 * h + 32]);
        for l in 0..32 {
            let (a, b, c, e) = (lv[j + l], lv[j + l + 32], lv[j + l + 64], lv[j + l + 96]);
            ql[l] = (a & 0xF) | ((c & 0xF) << 4);
            ql[l + 32] = (b & 0xF) | ((e & 0xF) << 4);
            qh[l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(scales.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    use crate::quant::SUPPORTED as TYPES;

    /// Largest round-trip error allowed, as a fraction of the block's largest magnitude.
    fn tolerance(dtype: GgmlDType) -> f32 {
        match dtype {
            GgmlDType::F32 => 0.0,
            GgmlDType::F16 => 1e-3,
            GgmlDType::BF16 => 8e-3,
            GgmlDType::Q8_0 => 0.006,
            GgmlDType::Q6_K => 0.03,
            // The signed extreme maps to the most negative level, so the opposite side clips
            // at 15/16 (Q5_0) or 7/8 (Q4_0) of it.
            GgmlDType::Q5_0 => 0.065,
            GgmlDType::Q5_K => 0.05,
            GgmlDType::Q4_0 => 0.13,
            _ => 0.1,
        }
    }

    #[test]
    fn quantize_then_dequantize_stays_close_for_every_supported_type() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 4 * QK_K;
        let x: Vec<f32> = (0..n).map(|i| rng.gen_range(-1.0f32..1.0) * (1.0 + (i / 64) as f32 * 0.3)).collect();
        for dtype in TYPES {
            let bytes = quantize(dtype, &x).unwrap();
            assert_eq!(bytes.len(), dtype.bytes_for(n).unwrap(), "{dtype}");
            let mut y = vec![0f32; n];
            dequantize(dtype, &bytes, &mut y).unwrap();
            for (blk_x, blk_y) in x.chunks(QK_K).zip(y.chunks(QK_K)) {
                let amax = blk_x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = blk_x.iter().zip(blk_y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= tolerance(dtype) * amax, "{dtype}: max error {err} vs amax {amax}");
            }
        }
    }

    #[test]
    fn all_zero_input_quantizes_to_exact_zeros() {
        for dtype in TYPES {
            let x = vec![0f32; QK_K];
            let bytes = quantize(dtype, &x).unwrap();
            let mut y = vec![1f32; QK_K];
            dequantize(dtype, &bytes, &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{dtype}");
        }
    }

    #[test]
    fn wrong_lengths_and_unsupported_types_are_errors_not_panics() {
        let mut out = vec![0f32; 32];
        assert!(matches!(dequantize(GgmlDType::Q8_0, &[0u8; 33], &mut out), Err(QuantError::ByteLength { expected: 34, got: 33, .. })));
        let mut out = vec![0f32; 31];
        assert!(matches!(dequantize(GgmlDType::Q4_0, &[0u8; 18], &mut out), Err(QuantError::NotBlockMultiple { len: 31, block: 32, .. })));
        assert!(matches!(quantize(GgmlDType::Q4_K, &[0f32; 255]), Err(QuantError::NotBlockMultiple { .. })));
        assert!(matches!(quantize(GgmlDType::Q2_K, &[0f32; 256]), Err(QuantError::Unsupported(GgmlDType::Q2_K))));
        let mut out = vec![0f32; 256];
        assert!(matches!(dequantize(GgmlDType::Q3_K, &[0u8; 110], &mut out), Err(QuantError::Unsupported(GgmlDType::Q3_K))));
    }

    #[test]
    fn k_scale_packing_round_trips_all_six_bit_values() {
        let sc = [0u8, 63, 17, 42, 63, 1, 33, 48];
        let mn = [63u8, 0, 5, 60, 31, 32, 62, 7];
        assert_eq!(k_scales_mins(&pack_k_scales(&sc, &mn)), (sc, mn));
    }
}
