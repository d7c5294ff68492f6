//! Weights repacked once at load for the GEMM kernels: [`GROUP`] rows interleaved per block.
//!
//! The kernels in `avx512` hold one row per 32-bit lane of a 512-bit register and broadcast
//! four activation bytes to every lane (`vpdpbusd`), so a block's integer dot products for 16
//! rows × one token take eight instructions, and the per-block scale work (convert, two
//! multiplies, add) is done once for 16 rows instead of once per row. This module is only
//! the layout — portable code, run once per matrix — and [`Packed::dequantize_row`], the
//! inverse the tests check it with.
//!
//! Layout of one group of 16 rows (rows past the matrix's end are zero: scale 0): for each of
//! the `nb` blocks of a row, `code_bytes` of codes; then for each block, `meta_bytes` of
//! scales. A code register (64 bytes) holds in lane `l` (row `16·group + l`) bytes `4l..4l+4`:
//! four consecutive elements of one row, a *chunk* (chunk `c` = elements `4c..4c+4`).
//!
//! - Q8_0 codes: 8 registers, chunk `g` in register `g`, each element as `w + 128` (unsigned for
//!   `vpdpbusd`). Meta: 16 f16 scales.
//! - Q4_0 / Q5_0 codes: 4 registers of the file's nibble bytes `qs[4g..4g+4]`: low nibbles chunk
//!   `g`, high nibbles chunk `g + 4`; Q5_0 then has 8 masks of 64 bits, mask `g`'s bit `4l + k`
//!   the fifth bit of element `4g + k` of lane `l`'s row. Meta: 16 f16 scales.
//! - Q4_K codes (256 elements, sub-block `s` = chunks `8s..8s+8`): 32 nibble registers,
//!   register `8c + g` holding chunk `g` of sub-block `2c` (low nibbles) and of `2c + 1` (high).
//!   Meta: 16 f16 `d`, 16 f16 `dmin`, the 8 six-bit scales as bytes (sub-block `s`: 16 bytes,
//!   lane order), then the 8 mins the same way.
//! - Q6_K codes (6-bit, 64 chunks): 32 nibble registers (register `i`: chunk `i` low, `i + 32`
//!   high), then 16 registers of the two high bits (register `i`: chunks `i, i + 16, i + 32,
//!   i + 48` at bits 0-1, 2-3, 4-5, 6-7). Meta: 16 f16 `d`, the 16 signed scales (sub-block
//!   `s` of 16 elements: 16 bytes, lane order).
//!
//! The result is about as many bytes as the file's rows (2.8% more for Q4_K and 4.6% for Q6_K,
//! whose scales are stored unpacked; rows padded to whole groups and 64-byte lines).

use super::arena::Region;
use super::blocks::{k_scales_mins, QK_K};
use super::GgmlDType;

/// Rows per interleaved group: the f32 lanes of a 512-bit register.
pub(crate) const GROUP: usize = 16;

/// A matrix in the interleaved layout of the module documentation.
pub(crate) struct Packed {
    /// The weight type the codes came from (read by the tests' inverse).
    #[cfg_attr(not(test), allow(dead_code))]
    dtype: GgmlDType,
    rows: usize,
    /// Blocks per row.
    nb: usize,
    /// Code bytes of one block of a group (see [`layout`]).
    code_bytes: usize,
    /// Scale bytes of one block of a group.
    meta_bytes: usize,
    /// Bytes from one group to the next (a whole number of lines).
    group_bytes: usize,
    /// `groups · group_bytes`, 64-byte aligned (on huge pages where the system allows).
    data: Region,
}

/// What the packed codes of a 32-element format (Q8_0, Q4_0, Q5_0) add to the value they
/// stand for: Q8_0 is stored as `w + 128` (unsigned for `vpdpbusd`), Q4_0 and Q5_0 keep the
/// file's `q = w + 8` / `w + 16`. The GEMM kernels take it off as `offset · Σ a` (but for
/// Q8_0 on AVX2 without VNNI, which turns the codes back into signed weights: `gemm256`).
pub(crate) fn code_offset(dtype: GgmlDType) -> i32 {
    match dtype {
        GgmlDType::Q8_0 => 128,
        GgmlDType::Q4_0 => 8,
        _ => 16,
    }
}

/// Whether `dtype` has a packed layout.
pub(crate) fn packable(dtype: GgmlDType) -> bool {
    layout(dtype).is_some()
}

/// (code bytes, meta bytes) of one block of a group of `dtype`, or `None` if not packable.
pub(crate) fn layout(dtype: GgmlDType) -> Option<(usize, usize)> {
    Some(match dtype {
        GgmlDType::Q8_0 => (512, 32),
        GgmlDType::Q4_0 => (256, 32),
        GgmlDType::Q5_0 => (320, 32),
        GgmlDType::Q4_K => (2048, 320),
        GgmlDType::Q6_K => (3072, 288),
        _ => return None,
    })
}

/// The 256 six-bit codes (0..63, value `q - 32`) of a Q6_K block, in element order.
fn q6_k_codes(b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for h in 0..2 {
        let (ql, qh) = (&b[64 * h..64 * h + 64], &b[128 + 32 * h..128 + 32 * h + 32]);
        for l in 0..32 {
            q[128 * h + l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            q[128 * h + 32 + l] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            q[128 * h + 64 + l] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[128 * h + 96 + l] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    q
}

/// The 256 four-bit codes of a Q4_K block, in element order.
fn q4_k_codes(b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    let qs = &b[16..144];
    for c in 0..4 {
        for l in 0..32 {
            q[64 * c + l] = qs[32 * c + l] & 0xF;
            q[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
    }
    q
}

impl Packed {
    /// Repacks `rows` rows of `dtype` blocks (`row(r)` gives row `r`'s encoded bytes, `nb`
    /// blocks each). Panics if `dtype` is not [`packable`].
    pub(crate) fn new<'a>(dtype: GgmlDType, rows: usize, nb: usize, row: impl Fn(usize) -> &'a [u8]) -> Self {
        let (code_bytes, meta_bytes) = layout(dtype).unwrap_or_else(|| panic!("not packable: {dtype}"));
        let group_bytes = (nb * (code_bytes + meta_bytes)).div_ceil(64) * 64;
        let groups = rows.div_ceil(GROUP);
        let mut data = Region::new(groups * group_bytes);
        let bytes = data.as_mut_slice();
        let type_size = dtype.type_size();
        for r in 0..rows {
            let (grp, lane) = (r / GROUP, r % GROUP);
            let src = row(r);
            debug_assert_eq!(src.len(), nb * type_size);
            let base = grp * group_bytes;
            for b in 0..nb {
                let blk = &src[b * type_size..(b + 1) * type_size];
                let (codes, meta) = bytes[base..base + group_bytes].split_at_mut(nb * code_bytes);
                let codes = &mut codes[b * code_bytes..(b + 1) * code_bytes];
                let meta = &mut meta[b * meta_bytes..(b + 1) * meta_bytes];
                // Byte `k` of lane `lane` of register `reg`.
                let at = |reg: usize, k: usize| reg * 64 + lane * 4 + k;
                match dtype {
                    GgmlDType::Q8_0 => {
                        for j in 0..32 {
                            codes[at(j / 4, j % 4)] = blk[2 + j] ^ 0x80;
                        }
                    }
                    GgmlDType::Q4_0 | GgmlDType::Q5_0 => {
                        let qs = if dtype == GgmlDType::Q4_0 { &blk[2..18] } else { &blk[6..22] };
                        for j in 0..16 {
                            codes[at(j / 4, j % 4)] = qs[j];
                        }
                        if dtype == GgmlDType::Q5_0 {
                            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                            for g in 0..8 {
                                let m = &mut codes[256 + g * 8..256 + g * 8 + 8];
                                let mut mask = u64::from_le_bytes(m.try_into().unwrap());
                                for k in 0..4 {
                                    mask |= (((qh >> (4 * g + k)) & 1) as u64) << (lane * 4 + k);
                                }
                                m.copy_from_slice(&mask.to_le_bytes());
                            }
                        }
                    }
                    GgmlDType::Q4_K => {
                        let q = q4_k_codes(blk);
                        for (e, &v) in q.iter().enumerate() {
                            let (sub, g, k) = (e / 32, (e % 32) / 4, e % 4);
                            codes[at(8 * (sub / 2) + g, k)] |= v << (4 * (sub % 2));
                        }
                        let (sc, mn) = k_scales_mins(&blk[4..16]);
                        meta[32 + 2 * lane..32 + 2 * lane + 2].copy_from_slice(&blk[2..4]);
                        for j in 0..8 {
                            meta[64 + 16 * j + lane] = sc[j];
                            meta[192 + 16 * j + lane] = mn[j];
                        }
                    }
                    GgmlDType::Q6_K => {
                        let q = q6_k_codes(blk);
                        for (e, &v) in q.iter().enumerate() {
                            let (c, k) = (e / 4, e % 4);
                            codes[at(c % 32, k)] |= (v & 0xF) << (4 * (c / 32));
                            codes[at(32 + c % 16, k)] |= (v >> 4) << (2 * (c / 16));
                        }
                        for s in 0..16 {
                            meta[32 + 16 * s + lane] = blk[192 + s];
                        }
                    }
                    _ => unreachable!(),
                }
                // The (first) f16 scale, `d`, of every format but Q6_K is at the block's start.
                let d_at = if dtype == GgmlDType::Q6_K { 208 } else { 0 };
                meta[2 * lane..2 * lane + 2].copy_from_slice(&blk[d_at..d_at + 2]);
            }
        }
        Self { dtype, rows, nb, code_bytes, meta_bytes, group_bytes, data }
    }

    /// Rows of the matrix (the last group may be partly padding).
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Groups of [`GROUP`] rows.
    pub(crate) fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    /// Blocks per row.
    pub(crate) fn blocks(&self) -> usize {
        self.nb
    }

    /// Code and scale bytes of one block of a group (a group's share of the work).
    pub(crate) fn block_bytes(&self) -> usize {
        self.code_bytes + self.meta_bytes
    }

    /// Bytes this layout holds (what repacking adds to the process).
    pub(crate) fn nbytes(&self) -> usize {
        self.data.len()
    }

    fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// Group `grp`'s bytes: `nb · code_bytes` of codes from a 64-byte boundary, then
    /// `nb · meta_bytes` of scales.
    pub(crate) fn group(&self, grp: usize) -> &[u8] {
        &self.bytes()[grp * self.group_bytes..(grp + 1) * self.group_bytes]
    }

    /// Row `r` decoded back to floats from the packed layout (the tests' check of `new`).
    #[cfg(test)]
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (g, lane) = (r / GROUP, r % GROUP);
        let grp = self.group(g);
        let f16_at = |m: &[u8], o: usize| half::f16::from_le_bytes([m[o], m[o + 1]]).to_f32();
        let at = |reg: usize, k: usize| reg * 64 + lane * 4 + k;
        for b in 0..self.nb {
            let codes = &grp[b * self.code_bytes..(b + 1) * self.code_bytes];
            let meta = &grp[self.nb * self.code_bytes + b * self.meta_bytes..][..self.meta_bytes];
            let d = f16_at(meta, 2 * lane);
            match self.dtype {
                GgmlDType::Q4_K | GgmlDType::Q6_K => {
                    for e in 0..QK_K {
                        out[b * QK_K + e] = if self.dtype == GgmlDType::Q4_K {
                            let (sub, g, k) = (e / 32, (e % 32) / 4, e % 4);
                            let q = (codes[at(8 * (sub / 2) + g, k)] >> (4 * (sub % 2))) & 0xF;
                            let (sc, mn) = (meta[64 + 16 * sub + lane], meta[192 + 16 * sub + lane]);
                            d * sc as f32 * q as f32 - f16_at(meta, 32 + 2 * lane) * mn as f32
                        } else {
                            let (c, k) = (e / 4, e % 4);
                            let lo = (codes[at(c % 32, k)] >> (4 * (c / 32))) & 0xF;
                            let hi = (codes[at(32 + c % 16, k)] >> (2 * (c / 16))) & 3;
                            let sc = meta[32 + 16 * (e / 16) + lane] as i8;
                            d * sc as f32 * ((lo | hi << 4) as i32 - 32) as f32
                        };
                    }
                }
                _ => {
                    for j in 0..32 {
                        let q = match self.dtype {
                            GgmlDType::Q8_0 => (codes[at(j / 4, j % 4)] ^ 0x80) as i8 as i32,
                            _ => {
                                let byte = codes[at((j % 16) / 4, j % 4)];
                                let nib = if j < 16 { byte & 0xF } else { byte >> 4 } as i32;
                                if self.dtype == GgmlDType::Q4_0 {
                                    nib - 8
                                } else {
                                    let mask = u64::from_le_bytes(codes[256 + (j / 4) * 8..][..8].try_into().unwrap());
                                    (nib | (((mask >> (lane * 4 + j % 4)) & 1) as i32) << 4) - 16
                                }
                            }
                        };
                        out[b * 32 + j] = d * q as f32;
                    }
                }
            }
        }
    }
}
