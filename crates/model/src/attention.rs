//! Causal attention over a sequence's KV cache: a tiled online-softmax ("flash") kernel
//! that never materialises the T×T score matrix, grouped-query and sliding-window aware,
//! reading keys and values (f16, see `kv_cache`) through a paged block table, plus the naive
//! reference it is tested against.

use half::f16;
use rayon::prelude::*;
use tpserve_types::kv::BlockId;

use crate::simd;

/// One layer's keys and values seen through a sequence's block table: position `p` is row
/// `table[p / block_size] * block_size + p % block_size` of `k` and `v` (`[rows, kv_dim]`).
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    /// The layer's whole key pool, `[rows, kv_dim]`; other sequences' blocks included.
    pub k: &'a [f16],
    /// The value pool, laid out as `k`.
    pub v: &'a [f16],
    /// The sequence's blocks in position order (`tpserve_types::kv`); entries for blocks a
    /// sliding window no longer reads may be `NO_BLOCK`.
    pub table: &'a [BlockId],
    /// Positions per block.
    pub block_size: usize,
}

impl<'a> KvView<'a> {
    /// Keys and values stored in position order (position p is row p).
    pub fn contiguous(k: &'a [f16], v: &'a [f16], kv_dim: usize) -> Self {
        Self { k, v, table: &[0], block_size: (k.len() / kv_dim.max(1)).max(1) }
    }
}

/// Keys scored per tile: the tile's scores live on the stack.
const TILE: usize = 64;

/// Shape of one attention call on this rank.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads on this rank; a multiple of `n_kv_heads`.
    pub n_heads: usize,
    /// KV heads on this rank; query head h reads KV head `h / (n_heads / n_kv_heads)`.
    pub n_kv_heads: usize,
    /// Floats per head, for queries, keys and values alike.
    pub head_dim: usize,
}

/// Where the queries and keys sit in the sequence.
#[derive(Debug, Clone, Copy)]
pub struct AttnSpan {
    /// Absolute position of the first query; query i is at `q_pos0 + i`. Keys at positions
    /// up to the last query's are in the cache.
    pub q_pos0: usize,
    /// A query at p sees key k only when p - k < window (None: every earlier key).
    pub window: Option<usize>,
}

impl AttnSpan {
    /// The key positions that a query at position `p` attends to.
    fn keys_for(&self, p: usize) -> std::ops::Range<usize> {
        let first_pos = match self.window {
            Some(w) => (p + 1).saturating_sub(w),
            None => 0,
        };
        first_pos..p + 1
    }
}

/// Heads handled together by one task: they share a KV head, so each key and value row is
/// read once for all of them.
const MAX_HEADS_PER_TASK: usize = 8;

/// `out[i, h] = softmax_j(q[i, h] · k[j, g(h)]) v[j, g(h)]` over the keys query i may see.
///
/// `q` and `out` are `[n_q, n_heads * head_dim]`; the rows of `kv` are `n_kv_heads * head_dim`
/// wide. The caller has already scaled `q`. One sequence's [`flash_attention_batch`].
pub fn flash_attention(q: &[f32], kv: KvView<'_>, shape: AttnShape, span: AttnSpan, out: &mut [f32]) {
    flash_attention_batch(shape, vec![AttnSeq { q, kv, span, out }]);
}

/// One sequence of a [`flash_attention_batch`]: its queries, its view of the cache, where
/// they sit, and where their outputs go (`q` and `out` `[n_q, n_heads * head_dim]`).
pub struct AttnSeq<'a> {
    /// The queries, already scaled.
    pub q: &'a [f32],
    /// The layer's cache through the sequence's block table.
    pub kv: KvView<'a>,
    /// The queries' positions.
    pub span: AttnSpan,
    /// The outputs, as long as `q`.
    pub out: &'a mut [f32],
}

/// [`flash_attention`] for every sequence of a batch at once, on the current rayon pool. A
/// task takes one query and a whole KV group's heads (each key and value row is then read
/// once for all of them) unless that would leave threads idle: then fewer heads, down to one
/// a task. Deciding over the batch rather than per sequence matters at decode: a sequence
/// has one query, and split head by head a KV head's keys and values were read from memory
/// once per query head that shares them (twice a layer on each rank of the default model
/// at tp = 2, four times at tp = 1), where a batch of sequences has tasks enough for every
/// thread with whole groups. A query's result does not depend on the split (see
/// [`blocked`]).
pub fn flash_attention_batch(shape: AttnShape, seqs: Vec<AttnSeq<'_>>) {
    let AttnShape { n_heads, n_kv_heads, head_dim: hd } = shape;
    let kv_dim = n_kv_heads * hd;
    // The AVX2 kernels read through raw pointers: these shapes are what keeps them in bounds.
    assert!(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "{n_heads} query heads cannot be grouped over {n_kv_heads} KV heads");
    assert!(hd > 0, "head dim 0");
    let group = n_heads / n_kv_heads;
    let mut queries = 0;
    for AttnSeq { q, kv, span, out } in &seqs {
        let (k, v) = (kv.k, kv.v);
        let n_q = q.len() / (n_heads * hd);
        assert!(q.len().is_multiple_of(n_heads * hd), "q is not [n_q, {n_heads} x {hd}]");
        assert_eq!(q.len(), out.len(), "attention output length");
        assert_eq!(k.len(), v.len(), "keys and values have different lengths");
        assert_eq!(k.len() % kv_dim, 0, "keys are not [n_k, {n_kv_heads} x {hd}]");
        if n_q > 0 {
            // Every block any query reads must be a block of the pool.
            let bs = kv.block_size;
            let rows = k.len() / kv_dim;
            let keys = span.keys_for(span.q_pos0);
            let last = span.q_pos0 + n_q - 1;
            assert!(bs > 0 && last / bs < kv.table.len(), "the block table does not reach position {last}");
            for &b in &kv.table[keys.start / bs..=last / bs] {
                assert!((b as usize + 1) * bs <= rows, "block {b} is outside the pool of {rows} rows");
            }
        }
        queries += n_q;
    }
    // Tasks enough to balance the threads (twice as many; one thread needs no split).
    let threads = rayon::current_num_threads();
    let wanted = if threads == 1 { 1 } else { 2 * threads };
    let hs = (1..=group.min(MAX_HEADS_PER_TASK)).rev().find(|&d| group % d == 0 && queries * (n_heads / d) >= wanted).unwrap_or(1);
    let (inputs, outs): (Vec<_>, Vec<_>) = seqs.into_iter().map(|AttnSeq { q, kv, span, out }| ((q, kv, span), out)).unzip();
    let tasks: Vec<(usize, usize, &mut [f32])> =
        outs.into_iter().enumerate().flat_map(|(si, out)| out.chunks_mut(hs * hd).enumerate().map(move |(task, o)| (si, task, o))).collect();
    tasks.into_par_iter().for_each(|(si, task, o)| {
        let (q, kv, span) = &inputs[si];
        let first = task * hs; // the sequence's (query, head) index of the task's first head
        let (i, h0) = (first / n_heads, first % n_heads);
        let g = h0 / group;
        let qs = &q[first * hd..(first + hs) * hd];
        let keys = span.keys_for(span.q_pos0 + i);
        let args = Attend { qs, k: kv.k, v: kv.v, table: kv.table, bs: kv.block_size, kv_dim, kv_off: g * hd, hd, hs, keys };
        #[cfg(target_arch = "x86_64")]
        if simd::use_avx2() && is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked at run time).
            return unsafe { attend_avx2(args, o) };
        }
        attend::<false>(args, o);
    });
}

/// One task's inputs: `hs` query heads (rows of `qs`) over the key positions in `keys`, all
/// reading the KV head at column `kv_off`.
struct Attend<'a> {
    /// The task's query rows, `[hs, hd]`, already scaled.
    qs: &'a [f32],
    /// The layer's key and value pools ([`KvView::k`], [`KvView::v`]).
    k: &'a [f16],
    v: &'a [f16],
    /// The sequence's block table and block size.
    table: &'a [BlockId],
    bs: usize,
    /// Floats per pool row (all KV heads of a position).
    kv_dim: usize,
    /// Column of the task's KV head within a row: `g * hd`.
    kv_off: usize,
    /// Head dim.
    hd: usize,
    /// Query heads in the task, at most [`MAX_HEADS_PER_TASK`].
    hs: usize,
    /// Absolute key positions the task's query attends to.
    keys: std::ops::Range<usize>,
}

impl Attend<'_> {
    /// Offset in `k` / `v` of the KV head's row at position `pos` (checked by
    /// [`flash_attention`] to be inside the pool).
    #[inline(always)]
    fn row(&self, pos: usize) -> usize {
        (self.table[pos / self.bs] as usize * self.bs + pos % self.bs) * self.kv_dim + self.kv_off
    }
}

/// [`attend`] for AVX2+FMA+F16C: register-blocked kernels when the head dim is a multiple of 8
/// (every real model), else the portable loops compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C. `args` must be as [`flash_attention`] builds it after its
/// checks (every row of `args.keys` through the table inside `k` and `v`, `qs` holding
/// `hs * hd` floats, `hs <= MAX_HEADS_PER_TASK`), and `o` must hold `hs * hd` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2(args: Attend<'_>, o: &mut [f32]) {
    if !args.hd.is_multiple_of(8) {
        return attend::<true>(args, o);
    }
    match args.hs {
        1 => blocked::attend::<1, 4, 2>(args, o),
        2 => blocked::attend::<2, 4, 2>(args, o),
        3 => blocked::attend::<3, 2, 2>(args, o),
        4 => blocked::attend::<4, 2, 2>(args, o),
        5 | 6 => blocked::attend::<6, 1, 1>(args, o),
        _ => blocked::attend::<8, 1, 1>(args, o),
    }
}

/// Register-blocked online-softmax attention for AVX2 (F16C widens the cache's f16 rows).
///
/// Scores: `KB` keys × `HS` heads at a time, each dot product one 256-bit accumulator running
/// over the head dim in order; values: `DC` 8-wide column chunks of all heads' outputs stay in
/// registers while the tile's keys stream past. Each key row is thus loaded once for all heads
/// of its group. Every score and output element is computed by the same operations in the
/// same order whatever `HS`/`KB` are, so a query's result does not depend on how many heads or
/// queries shared its task (decode and prefill agree bit for bit).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over register tiles read best as the math
mod blocked {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{Attend, MAX_HEADS_PER_TASK, TILE};
    use crate::simd::x86::hsum;

    /// How many key rows ahead [`scores`] prefetches.
    const PREFETCH: usize = 8;

    /// Eight f16 values at `p` widened to f32.
    ///
    /// # Safety
    /// AVX2, F16C; `p..p + 8` readable.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// `scores[h][j] = q_h · k_j` for the key rows at `offs[j]` (`j < n = offs.len()`), `h < hs`
    /// (HS is the padded head count).
    ///
    /// # Safety
    /// AVX2, FMA, F16C; `a.hd` a multiple of 8 and `a.hs <= HS`; `offs.len() <= TILE`, each
    /// `offs[j]` [`Attend::row`] of a position inside `a.keys` (so inside the pool); `a.qs`
    /// holds `a.hs * a.hd` floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scores<const HS: usize, const KB: usize>(a: &Attend<'_>, offs: &[usize], scores: &mut [[f32; TILE]; MAX_HEADS_PER_TASK]) {
        let n = offs.len();
        let hs = a.hs.min(HS);
        let qp = a.qs.as_ptr();
        let kp = a.k.as_ptr();
        let mut j = 0;
        while j < n {
            let kb = if j + KB <= n { KB } else { 1 };
            let mut acc = [[_mm256_setzero_ps(); KB]; HS];
            let rows: [*const f16; KB] = std::array::from_fn(|b| kp.add(offs[j + b.min(kb - 1)]));
            // Rows sit in blocks scattered over the pool, where the hardware prefetcher
            // starts late: ask for the keys PREFETCH rows ahead, and for these rows' values,
            // which `values` reads after the tile's softmax.
            for b in 0..kb {
                let ahead = offs.get(j + b + PREFETCH).map(|&o| kp.add(o));
                let value = a.v.as_ptr().add(offs[j + b]);
                for line in (0..a.hd).step_by(32) {
                    if let Some(ahead) = ahead {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(line) as *const i8);
                    }
                    _mm_prefetch::<_MM_HINT_T0>(value.add(line) as *const i8);
                }
            }
            let mut d = 0;
            while d < a.hd {
                let kv: [__m256; KB] = std::array::from_fn(|b| if b < kb { load8(rows[b].add(d)) } else { _mm256_setzero_ps() });
                for h in 0..hs {
                    let qv = _mm256_loadu_ps(qp.add(h * a.hd + d));
                    for b in 0..kb {
                        acc[h][b] = _mm256_fmadd_ps(qv, kv[b], acc[h][b]);
                    }
                }
                d += 8;
            }
            for h in 0..hs {
                for b in 0..kb {
                    scores[h][j + b] = hsum(acc[h][b]);
                }
            }
            j += kb;
        }
    }

    /// `o_h += Σ_j p[h][j] · v_j` (the value rows at `offs[j]`) for all heads, `DC` column
    /// chunks at a time.
    ///
    /// # Safety
    /// As [`scores`], with `o` holding `a.hs * a.hd` floats instead of the query condition.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn values<const HS: usize, const DC: usize>(a: &Attend<'_>, offs: &[usize], p: &[[f32; TILE]; MAX_HEADS_PER_TASK], o: &mut [f32]) {
        let hs = a.hs.min(HS);
        let op = o.as_mut_ptr();
        let vp = a.v.as_ptr();
        let mut d = 0;
        while d < a.hd {
            let dc = if d + 8 * DC <= a.hd { DC } else { 1 };
            let mut acc = [[_mm256_setzero_ps(); DC]; HS];
            for h in 0..hs {
                for c in 0..dc {
                    acc[h][c] = _mm256_loadu_ps(op.add(h * a.hd + d + 8 * c));
                }
            }
            for (j, &off) in offs.iter().enumerate() {
                let row = vp.add(off + d);
                let vv: [__m256; DC] = std::array::from_fn(|c| if c < dc { load8(row.add(8 * c)) } else { _mm256_setzero_ps() });
                for h in 0..hs {
                    let pj = _mm256_broadcast_ss(&p[h][j]);
                    for c in 0..dc {
                        acc[h][c] = _mm256_fmadd_ps(pj, vv[c], acc[h][c]);
                    }
                }
            }
            for h in 0..hs {
                for c in 0..dc {
                    _mm256_storeu_ps(op.add(h * a.hd + d + 8 * c), acc[h][c]);
                }
            }
            d += 8 * dc;
        }
    }

    /// The online softmax of [`super::attend`] with the blocked score and value kernels.
    ///
    /// # Safety
    /// As [`super::attend_avx2`], plus `a.hd` a multiple of 8 and `a.hs <= HS`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend<const HS: usize, const KB: usize, const DC: usize>(a: Attend<'_>, o: &mut [f32]) {
        let (hd, hs) = (a.hd, a.hs);
        o.fill(0.0);
        let mut m = [f32::NEG_INFINITY; MAX_HEADS_PER_TASK];
        let mut l = [0f32; MAX_HEADS_PER_TASK];
        let mut sc = [[0f32; TILE]; MAX_HEADS_PER_TASK];
        let mut start = a.keys.start;
        while start < a.keys.end {
            let n = (start + TILE).min(a.keys.end) - start;
            // The tile's rows through the block table, worked out once (a division each) for
            // the scores and for every column pass of the values.
            let mut offs = [0usize; TILE];
            for (j, o) in offs[..n].iter_mut().enumerate() {
                *o = a.row(start + j);
            }
            let offs = &offs[..n];
            scores::<HS, KB>(&a, offs, &mut sc);
            for h in 0..hs {
                super::softmax_tile(&mut sc[h][..n], &mut m[h], &mut l[h], &mut o[h * hd..(h + 1) * hd]);
            }
            values::<HS, DC>(&a, offs, &sc, o);
            start += n;
        }
        super::normalize(o, &l[..hs], hd);
    }
}

/// Online softmax over one task's keys; writes the `hs` output rows into `o`.
#[inline(always)]
fn attend<const FMA: bool>(args: Attend<'_>, o: &mut [f32]) {
    let Attend { qs, k, v, hd, hs, .. } = args;
    let keys = args.keys.clone();
    o.fill(0.0);
    let mut m = [f32::NEG_INFINITY; MAX_HEADS_PER_TASK];
    let mut l = [0f32; MAX_HEADS_PER_TASK];
    let mut scores = [[0f32; TILE]; MAX_HEADS_PER_TASK];
    // One key or value row widened from f16.
    let mut row = vec![0f32; hd];
    let mut start = keys.start;
    while start < keys.end {
        let end = (start + TILE).min(keys.end);
        let n = end - start;
        for j in 0..n {
            widen(&k[args.row(start + j)..][..hd], &mut row);
            for h in 0..hs {
                scores[h][j] = simd::dot_body::<FMA>(&qs[h * hd..(h + 1) * hd], &row);
            }
        }
        for h in 0..hs {
            softmax_tile(&mut scores[h][..n], &mut m[h], &mut l[h], &mut o[h * hd..(h + 1) * hd]);
        }
        for j in 0..n {
            widen(&v[args.row(start + j)..][..hd], &mut row);
            for h in 0..hs {
                simd::axpy_body::<FMA>(&mut o[h * hd..(h + 1) * hd], scores[h][j], &row);
            }
        }
        start = end;
    }
    normalize(o, &l[..hs], hd);
}

/// `out = x` as f32 (exact: every f16 is an f32).
#[inline(always)]
fn widen(x: &[f16], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = v.to_f32();
    }
}

/// One tile of the online softmax for one head: turns the tile's scores `s` into weights
/// `exp(s - m)` against the running maximum `m`, rescales the output so far `o` and the
/// running sum `l` when the maximum grows.
#[inline(always)]
fn softmax_tile(s: &mut [f32], m: &mut f32, l: &mut f32, o: &mut [f32]) {
    let tile_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let m_new = m.max(tile_max);
    // Rescale what we have so far to the new maximum (exp(-inf) = 0 on the first tile).
    let correction = (*m - m_new).exp();
    if correction != 1.0 {
        simd::scale_body(o, correction);
    }
    *l *= correction;
    for p in s.iter_mut() {
        *p = (*p - m_new).exp();
        *l += *p;
    }
    *m = m_new;
}

/// Divides each head's output row (`hd` long) by its softmax sum.
#[inline(always)]
fn normalize(o: &mut [f32], l: &[f32], hd: usize) {
    for (row, &l) in o.chunks_exact_mut(hd).zip(l) {
        if l > 0.0 {
            simd::scale_body(row, 1.0 / l);
        }
    }
}

/// The textbook version in f64: full score rows, softmax, weighted sum, over contiguous
/// `k` and `v` (`[n_k, kv_dim]`, position j is row j). The ground truth of the kernel's tests;
/// too slow to serve with.
pub fn naive_attention(q: &[f32], k: &[f32], v: &[f32], shape: AttnShape, span: AttnSpan, out: &mut [f32]) {
    let AttnShape { n_heads, n_kv_heads, head_dim: hd } = shape;
    let kv_dim = n_kv_heads * hd;
    let n_k = k.len() / kv_dim;
    let n_q = q.len() / (n_heads * hd);
    for i in 0..n_q {
        let p = span.q_pos0 + i;
        for h in 0..n_heads {
            let g = h / (n_heads / n_kv_heads);
            let qv = &q[(i * n_heads + h) * hd..][..hd];
            let scores: Vec<f64> = (0..n_k)
                .map(|j| {
                    let kp = j;
                    let visible = kp <= p && span.window.is_none_or(|w| p - kp < w);
                    if visible {
                        (0..hd).map(|d| qv[d] as f64 * k[j * kv_dim + g * hd + d] as f64).sum()
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f64 = w.iter().sum();
            let o = &mut out[(i * n_heads + h) * hd..][..hd];
            for d in 0..hd {
                let acc: f64 = (0..n_k).map(|j| w[j] * v[j * kv_dim + g * hd + d] as f64).sum();
                o[d] = if z > 0.0 { (acc / z) as f32 } else { 0.0 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random values in [-2, 2) that are exact f16s (the cache stores f16; the naive
    /// reference then sees the very values the kernel reads).
    fn random_f16s(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| f16::from_f32(rng.gen_range(-2.0f32..2.0)).to_f32()).collect()
    }

    fn f16s(x: &[f32]) -> Vec<f16> {
        x.iter().map(|&v| f16::from_f32(v)).collect()
    }

    fn check(shape: AttnShape, n_q: usize, n_k: usize, span: AttnSpan, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut r = |n: usize| (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect::<Vec<_>>();
        let q = r(n_q * shape.n_heads * shape.head_dim);
        let k = random_f16s(&mut rng, n_k * shape.n_kv_heads * shape.head_dim);
        let v = random_f16s(&mut rng, n_k * shape.n_kv_heads * shape.head_dim);
        let mut got = vec![0f32; q.len()];
        let mut want = vec![0f32; q.len()];
        let kv_dim = shape.n_kv_heads * shape.head_dim;
        flash_attention(&q, KvView::contiguous(&f16s(&k), &f16s(&v), kv_dim), shape, span, &mut got);
        naive_attention(&q, &k, &v, shape, span, &mut want);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "element {i}: flash {a} vs naive {b} ({shape:?}, {span:?}, n_q {n_q}, n_k {n_k})");
        }
    }

    #[test]
    fn flash_equals_naive_for_odd_lengths_windows_and_grouped_heads() {
        let shapes = [
            AttnShape { n_heads: 4, n_kv_heads: 1, head_dim: 16 },
            AttnShape { n_heads: 6, n_kv_heads: 2, head_dim: 8 },
            AttnShape { n_heads: 3, n_kv_heads: 3, head_dim: 5 },
            // Head dims that take the register-blocked AVX2 kernels, with groups of 1..8.
            AttnShape { n_heads: 4, n_kv_heads: 1, head_dim: 64 },
            AttnShape { n_heads: 8, n_kv_heads: 1, head_dim: 24 },
            AttnShape { n_heads: 6, n_kv_heads: 2, head_dim: 32 },
            AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 40 },
            AttnShape { n_heads: 5, n_kv_heads: 1, head_dim: 16 },
        ];
        let mut seed = 0;
        for shape in shapes {
            for (n_q, n_k) in [(1, 1), (1, 67), (13, 13), (29, 200), (7, 129)] {
                for window in [None, Some(1), Some(5), Some(64), Some(65), Some(1000)] {
                    seed += 1;
                    let span = AttnSpan { q_pos0: n_k - n_q, window };
                    check(shape, n_q, n_k, span, seed);
                }
            }
        }
    }

    #[test]
    fn paged_keys_in_shuffled_blocks_give_the_same_result_as_contiguous_ones() {
        // 170 positions in blocks of 16 spread over a pool of 20 blocks in another order;
        // queries at 160..170 with a window of 37 never read blocks 0..7, which are absent.
        for head_dim in [12, 64] {
            let shape = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim };
            let (n_q, n_k, bs) = (10, 170, 16);
            let mut rng = rand::rngs::StdRng::seed_from_u64(99);
            let mut r = |n: usize| (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect::<Vec<_>>();
            let q = r(n_q * 2 * head_dim);
            let (k, v) = (random_f16s(&mut rng, n_k * head_dim), random_f16s(&mut rng, n_k * head_dim));
            let span = AttnSpan { q_pos0: 160, window: Some(37) };
            let mut want = vec![0f32; q.len()];
            naive_attention(&q, &k, &v, shape, span, &mut want);
            let table: Vec<BlockId> = (0..n_k.div_ceil(bs)).map(|b| if b < 7 { tpserve_types::kv::NO_BLOCK } else { (19 - b) as BlockId }).collect();
            let (mut pk, mut pv) = (vec![f16::NAN; 20 * bs * head_dim], vec![f16::NAN; 20 * bs * head_dim]);
            for p in 7 * bs..n_k {
                let row = (table[p / bs] as usize * bs + p % bs) * head_dim;
                pk[row..row + head_dim].copy_from_slice(&f16s(&k[p * head_dim..(p + 1) * head_dim]));
                pv[row..row + head_dim].copy_from_slice(&f16s(&v[p * head_dim..(p + 1) * head_dim]));
            }
            let mut got = vec![0f32; q.len()];
            flash_attention(&q, KvView { k: &pk, v: &pv, table: &table, block_size: bs }, shape, span, &mut got);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "paged {a} vs naive {b}");
            }
        }
    }

    #[test]
    fn a_querys_output_is_bit_identical_alone_or_in_a_prefill_batch() {
        // Decode (one query: one task per head) and prefill (many: one task per KV group)
        // must agree exactly, or a chunked prefill would not equal a one-shot one.
        let shape = AttnShape { n_heads: 4, n_kv_heads: 1, head_dim: 64 };
        let (n_q, n_k) = (23, 150);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut r = |n: usize| (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect::<Vec<_>>();
        let q = r(n_q * 4 * 64);
        let (k, v) = (f16s(&r(n_k * 64)), f16s(&r(n_k * 64)));
        let span = AttnSpan { q_pos0: n_k - n_q, window: Some(100) };
        let mut all = vec![0f32; q.len()];
        // Two threads and 23 queries: the prefill split (one task per KV group) for sure.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| flash_attention(&q, KvView::contiguous(&k, &v, 64), shape, span, &mut all));
        for i in 0..n_q {
            let mut one = vec![0f32; 4 * 64];
            let span1 = AttnSpan { q_pos0: span.q_pos0 + i, ..span };
            let k_end = (span1.q_pos0 + 1) * 64;
            flash_attention(&q[i * 256..(i + 1) * 256], KvView::contiguous(&k[..k_end], &v[..k_end], 64), shape, span1, &mut one);
            assert_eq!(one, all[i * 256..(i + 1) * 256], "query {i}");
        }
    }

    #[test]
    fn a_batch_of_sequences_gives_each_sequences_own_result_bit_for_bit() {
        // Five sequences in one shared pool of shuffled blocks: four decoding (one query at
        // positions 0, 40, 95, 150) and one prefilling 9 queries, through one batched call on
        // 1, 3 and 16 threads (13 queries: whole KV groups per task below 14 threads, heads
        // split one a task at 16), against each sequence alone. 4 heads over 2 KV heads, head
        // dim 64 (the blocked kernels).
        let shape = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 64 };
        let (q_dim, kv_dim, bs, pool_blocks) = (4 * 64, 2 * 64, 16, 64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        let pk = f16s(&random_f16s(&mut rng, pool_blocks * bs * kv_dim));
        let pv = f16s(&random_f16s(&mut rng, pool_blocks * bs * kv_dim));
        let mut free: Vec<BlockId> = (0..pool_blocks as BlockId).rev().collect();
        let seqs: Vec<(usize, usize, Vec<BlockId>)> = [(0, 1), (40, 1), (95, 1), (150, 1), (60, 9)]
            .into_iter()
            .map(|(pos, n_q): (usize, usize)| (pos, n_q, (0..(pos + n_q).div_ceil(bs)).map(|_| free.remove(rng.gen_range(0..free.len()))).collect()))
            .collect();
        let qs: Vec<Vec<f32>> = seqs.iter().map(|&(_, n_q, _)| (0..n_q * q_dim).map(|_| rng.gen_range(-2.0f32..2.0)).collect()).collect();
        let span = |pos| AttnSpan { q_pos0: pos, window: None };
        let alone: Vec<Vec<f32>> = seqs
            .iter()
            .zip(&qs)
            .map(|((pos, _, table), q)| {
                let mut out = vec![0f32; q.len()];
                flash_attention(q, KvView { k: &pk, v: &pv, table, block_size: bs }, shape, span(*pos), &mut out);
                out
            })
            .collect();
        for threads in [1, 3, 16] {
            let mut outs: Vec<Vec<f32>> = qs.iter().map(|q| vec![f32::NAN; q.len()]).collect();
            let batch = seqs
                .iter()
                .zip(&qs)
                .zip(&mut outs)
                .map(|(((pos, _, table), q), out)| AttnSeq { q, kv: KvView { k: &pk, v: &pv, table, block_size: bs }, span: span(*pos), out })
                .collect();
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| flash_attention_batch(shape, batch));
            assert_eq!(outs, alone, "{threads} threads");
        }
    }

    /// A speed check run by hand (`cargo test -p tpserve-model --release --lib
    /// attention_throughput -- --ignored --nocapture`): one decode step's attention on a rank
    /// of the default model at tp = 2 (2 query heads over 1 KV head of 256), 32 sequences at
    /// position 200, 18 layers, every sequence's blocks scattered over a pool too large for
    /// the caches, on one thread.
    #[test]
    #[ignore]
    fn attention_throughput() {
        let shape = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 256 };
        let (bs, seqs, layers, pos) = (16, 32, 18, 200);
        let blocks = seqs * layers * (pos + 1usize).div_ceil(bs);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let pk: Vec<f16> = (0..blocks * bs * 256).map(|_| f16::from_f32(rng.gen_range(-1.0..1.0))).collect();
        let pv = pk.clone();
        let mut free: Vec<BlockId> = (0..blocks as BlockId).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.gen_range(0..=i));
        }
        let tables: Vec<Vec<BlockId>> = free.chunks((pos + 1usize).div_ceil(bs)).map(|c| c.to_vec()).collect();
        let q: Vec<f32> = (0..2 * 256).map(|_| rng.gen_range(-0.1..0.1)).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for layer in 0..layers {
                let mut outs = vec![vec![0f32; q.len()]; seqs];
                let batch = outs
                    .iter_mut()
                    .zip(&tables[layer * seqs..])
                    .map(|(out, table)| AttnSeq {
                        q: &q,
                        kv: KvView { k: &pk, v: &pv, table, block_size: bs },
                        span: AttnSpan { q_pos0: pos, window: None },
                        out,
                    })
                    .collect();
                pool.install(|| flash_attention_batch(shape, batch));
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let bytes = (seqs * layers * (pos + 1) * 2 * 256 * 2) as f64;
        eprintln!("attention of one decode step: {:.2} ms, {:.1} GB/s of keys and values", best * 1e3, bytes / best / 1e9);
    }

    #[test]
    fn a_query_sees_exactly_window_keys_including_itself() {
        let span = AttnSpan { q_pos0: 0, window: Some(512) };
        assert_eq!(span.keys_for(511), 0..512);
        assert_eq!(span.keys_for(512), 1..513);
        assert_eq!(span.keys_for(3), 0..4);
    }
}
