// tpserve's own CUDA kernels (the `cuda` feature of tpserve-model).
//
// build.rs compiles this file to PTX (`nvcc --ptx -O3 -arch=compute_$CUDA_COMPUTE_CAP`) into
// $OUT_DIR/tpserve_kernels.ptx; the Rust side loads that PTX and launches the kernels below by
// name. Every kernel is `extern "C"` (unmangled names), works on f32 activations laid out
// row-major, and takes `int` (int32) sizes. All pointers are device memory.
//
// ---------------------------------------------------------------------------------------------
// LAUNCH CONFIGURATION (the Rust side follows this exactly; no kernel uses dynamic shared
// memory, so shared_mem_bytes = 0 everywhere).
//
//   kernel               grid (x, y, z)                         block (x, y, z)   dyn. smem
//   -------------------  -------------------------------------  ----------------  ---------
//   tp_rms_norm          (rows, 1, 1)                           (256, 1, 1)       0
//   tp_rope              (ceil(n_tokens*n_heads*(rope_dims/2)   (256, 1, 1)       0
//                          / 256), 1, 1)
//   tp_gelu_gate         (ceil(n / 256), 1, 1)                  (256, 1, 1)       0
//   tp_silu_gate         (ceil(n / 256), 1, 1)                  (256, 1, 1)       0
//   tp_add               (ceil(n / 256), 1, 1)                  (256, 1, 1)       0
//   tp_scale             (ceil(n / 256), 1, 1)                  (256, 1, 1)       0
//   tp_softcap           (ceil(n / 256), 1, 1)                  (256, 1, 1)       0
//   tp_gather_rows       (n_rows, 1, 1)                         (256, 1, 1)       0
//   tp_kv_write          (n, 1, 1)                              (256, 1, 1)       0
//   tp_paged_attention   (n_tokens, n_heads, 1)                 (128, 1, 1)       0
//
// Never launch with a zero-sized grid (CUDA rejects it): skip the launch when n / rows /
// n_tokens is 0.
//
// Robustness notes:
//  * The element-wise kernels and tp_rope use grid-stride loops, so a smaller grid (e.g. a
//    capped one) is also correct; the ceil(n/256) grid above is simply one thread per element.
//  * The row kernels (tp_rms_norm, tp_gather_rows, tp_kv_write) loop over their row with
//    stride blockDim.x, so they are correct for any block size that is a multiple of 32 up to
//    1024 (256 is the documented one; 128 suits short rows such as per-head norms too).
//  * tp_paged_attention needs exactly 128 threads (4 warps); with any other block size it
//    writes NaN to its output row so the mistake is visible. It also writes NaN when
//    head_dim is outside 1..=256 or n_heads is not a multiple of n_kv_heads.
//  * Offsets into buffers are computed in 64-bit, so tensors/caches above 2^31 elements are fine
//    (the int32 arguments only bound each individual count).
// ---------------------------------------------------------------------------------------------

#include <cuda_fp16.h>

#define TP_FULL_MASK 0xffffffffu

// Sum of `v` over the 32 lanes of a warp; every lane receives the total.
__device__ __forceinline__ float tp_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(TP_FULL_MASK, v, o);
    return v;
}

// Grid-stride index helpers (64-bit so `i + stride` never overflows for n near 2^31).
#define TP_GRID_STRIDE_LOOP(i, n)                                                            \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)

// =============================================================================================
// 1. RMSNorm: out[r, i] = x[r, i] * (1 / sqrt(mean(x[r, :]^2) + eps)) * w[i].
//
// One block per row (grid.x = rows). x may equal out (in place): each element is read and then
// written by the same thread, and the whole row has been read (pass 1) before the block-wide
// barrier that precedes any write (pass 2). Used for hidden rows (dim = hidden) and for the
// per-head q/k norms (rows = tokens * heads, dim = head_dim).
//
// The scale is computed as 1.0f / sqrtf(...) (IEEE-rounded, nvcc does not use fast math here)
// rather than rsqrtf (approximate, ~2 ulp), and applied as x * (scale * w), exactly the order of
// the CPU implementation (layers.rs RmsNorm), so only the order of the f32 sum differs.
// =============================================================================================
extern "C" __global__ void tp_rms_norm(const float* x, const float* w, float* out, int rows, int dim,
                                       float eps) {
    const int r = blockIdx.x;
    if (r >= rows) return;  // block-uniform, so it is safe before __syncthreads
    const float* xr = x + (long long)r * dim;
    float* outr = out + (long long)r * dim;

    // Pass 1: per-thread partial sum of squares, then warp, then block reduction.
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = xr[i];
        ss += v * v;
    }
    ss = tp_warp_sum(ss);

    __shared__ float warp_sums[32];  // up to 1024 threads = 32 warps
    __shared__ float row_scale;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = (blockDim.x + 31) >> 5;
    if (lane == 0) warp_sums[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        float t = lane < n_warps ? warp_sums[lane] : 0.0f;
        t = tp_warp_sum(t);
        if (lane == 0) row_scale = 1.0f / sqrtf(t / (float)dim + eps);
    }
    __syncthreads();

    // Pass 2: scale (in place allowed: same thread reads then writes element i).
    const float scale = row_scale;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) outr[i] = xr[i] * (scale * w[i]);
}

// =============================================================================================
// 2. RoPE, in place, on x = [n_tokens, n_heads * head_dim].
//
// One thread per (token t, head h, pair i), i in 0..rope_dims/2, flattened as
// idx = (t * n_heads + h) * half + i. The frequency and angle are computed in double and
// cos/sin rounded to float, exactly as the CPU table (model.rs RopeTable):
//   freq  = pow((double)base, -2.0 * i / rope_dims)
//   angle = (double)pos[t] * freq
// neox = 1: the pair is (i, i + rope_dims/2); neox = 0 (interleaved): (2i, 2i + 1).
// Dimensions rope_dims..head_dim are never touched. An odd rope_dims leaves its last
// dimension alone (half = rope_dims / 2, as on the CPU).
// =============================================================================================
extern "C" __global__ void tp_rope(float* x, const int* pos, int n_tokens, int n_heads, int head_dim,
                                   int rope_dims, float base, int neox) {
    const int half = rope_dims / 2;
    if (half <= 0) return;
    const long long total = (long long)n_tokens * n_heads * half;
    TP_GRID_STRIDE_LOOP(idx, total) {
        const int i = (int)(idx % half);
        const long long th = idx / half;  // t * n_heads + h
        const int t = (int)(th / n_heads);

        const double freq = pow((double)base, (-2.0 * (double)i) / (double)rope_dims);
        double sd, cd;
        sincos((double)pos[t] * freq, &sd, &cd);
        const float s = (float)sd;
        const float c = (float)cd;

        float* head = x + th * head_dim;  // row t, head h
        const int i0 = neox ? i : 2 * i;
        const int i1 = neox ? i + half : 2 * i + 1;
        const float x0 = head[i0];
        const float x1 = head[i1];
        head[i0] = x0 * c - x1 * s;
        head[i1] = x0 * s + x1 * c;
    }
}

// =============================================================================================
// 3. Gated activations (in place into gate): gate[i] = act(gate[i]) * up[i].
// =============================================================================================

// gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written as on the CPU
// (simd.rs gelu_tanh). Note the CPU's Gemma path goes through an f16 lookup table
// (llama.cpp-style), so results differ from that path by f16 rounding.
extern "C" __global__ void tp_gelu_gate(float* gate, const float* up, int n) {
    const float kSqrt2OverPi = 0.7978845608028654f;
    TP_GRID_STRIDE_LOOP(i, n) {
        const float g = gate[i];
        const float a = 0.5f * g * (1.0f + tanhf(kSqrt2OverPi * (g + 0.044715f * g * g * g)));
        gate[i] = a * up[i];
    }
}

// silu(x) = x / (1 + exp(-x)).
extern "C" __global__ void tp_silu_gate(float* gate, const float* up, int n) {
    TP_GRID_STRIDE_LOOP(i, n) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// =============================================================================================
// 4. Element-wise arithmetic.
// =============================================================================================

// x += y (x and y must not partially overlap; x == y doubles x).
extern "C" __global__ void tp_add(float* x, const float* y, int n) {
    TP_GRID_STRIDE_LOOP(i, n) x[i] += y[i];
}

// x *= s.
extern "C" __global__ void tp_scale(float* x, int n, float s) {
    TP_GRID_STRIDE_LOOP(i, n) x[i] *= s;
}

// x = cap * tanh(x / cap) (Gemma 2-style logit soft-capping).
extern "C" __global__ void tp_softcap(float* x, int n, float cap) {
    TP_GRID_STRIDE_LOOP(i, n) x[i] = cap * tanhf(x[i] / cap);
}

// =============================================================================================
// 5. Row gather: out[i, :] = x[rows[i], :], x and out both `dim` wide (embedding lookup,
// picking the last token of each sequence, ...). One block per output row (grid.x = n_rows).
// rows[i] must be a valid row of x (x's row count is not passed, so it cannot be checked).
// =============================================================================================
extern "C" __global__ void tp_gather_rows(const float* x, const int* rows, float* out, int n_rows,
                                          int dim) {
    const int i = blockIdx.x;
    if (i >= n_rows) return;
    const float* src = x + (long long)rows[i] * dim;
    float* dst = out + (long long)i * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) dst[j] = src[j];
}

// =============================================================================================
// 6. KV-cache write: row i of k and v ([n, kv_dim] f32) is rounded to f16 (round to nearest
// even) into row slots[i] of k_cache and v_cache ([pool_rows, kv_dim] f16). One block per row
// (grid.x = n). A negative slot skips that row (handy for padding); any other slot must be a
// valid pool row.
// =============================================================================================
extern "C" __global__ void tp_kv_write(const float* k, const float* v, const int* slots, __half* k_cache,
                                       __half* v_cache, int n, int kv_dim) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const int slot = slots[i];
    if (slot < 0) return;
    const float* ks = k + (long long)i * kv_dim;
    const float* vs = v + (long long)i * kv_dim;
    __half* kd = k_cache + (long long)slot * kv_dim;
    __half* vd = v_cache + (long long)slot * kv_dim;
    for (int j = threadIdx.x; j < kv_dim; j += blockDim.x) {
        kd[j] = __float2half_rn(ks[j]);
        vd[j] = __float2half_rn(vs[j]);
    }
}

// =============================================================================================
// 7. Paged attention (causal, sliding-window aware, grouped-query), online softmax.
//
//   q, out   : [n_tokens, n_heads * head_dim] f32; q is already scaled by 1/sqrt(head_dim)
//              (or whatever the model uses) -- no scaling happens here. out may even be q
//              (each block reads its q slice into registers before writing the same slice).
//   k_cache, v_cache : [pool_rows, n_kv_heads * head_dim] f16; pool row of position kp of
//              sequence s is tables[table_off[s] + kp / block_size] * block_size
//              + kp % block_size.
//   tok_seq[t], tok_pos[t] : the sequence and absolute position of query token t.
//   window   : > 0 => token at p sees keys kp with p - kp < window; <= 0 => all kp <= p.
//
// Launch: grid = (n_tokens, n_heads), block = 128 (4 warps), no dynamic shared memory.
// One block computes one (token t, query head h):
//   * kv head g = h / (n_heads / n_kv_heads) (grouped-query attention).
//   * The visible keys are kp in [first, p], first = window > 0 ? max(0, p + 1 - window) : 0.
//     That range is never empty (it holds p itself), and block-table entries are only read for
//     kp in that range, so entries for blocks before first / block_size (which may be -1 or
//     garbage once the window has slid past them) are never touched.
//   * The keys are cut into tiles of ATTN_KPT consecutive positions; warp w takes tiles
//     w, w + 4, w + 8, ... . Within a warp, lane l owns dims d = l + 32 j (j < 8), so head_dim
//     up to 256 and any head_dim (not only multiples of 32: dims >= head_dim are masked) work;
//     a key row is read by the warp as contiguous f16 (coalesced).
//   * Per tile a warp computes the ATTN_KPT scores (partial dot products + a warp
//     shuffle reduction, which leaves every lane with the full score), then does one online
//     softmax update: m' = max(m, scores), rescale l and acc by exp(m - m'), add
//     exp(s - m') and exp(s - m') * v. Everything accumulates in f32; scores are never stored
//     beyond the current tile.
//   * Finally the 4 warps' (m, l, acc) are merged through shared memory:
//     M = max m_w, out = sum_w exp(m_w - M) acc_w / sum_w exp(m_w - M) l_w.
//     A warp that got no tile has m_w = -inf, l_w = 0, acc_w = 0 and weight exactly 0.
// =============================================================================================

#define ATTN_THREADS 128
#define ATTN_WARPS (ATTN_THREADS / 32)
#define ATTN_MAX_HEAD_DIM 256
#define ATTN_DIMS_PER_LANE (ATTN_MAX_HEAD_DIM / 32)  // 8
#define ATTN_KPT 4                                   // keys per warp tile

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    tp_paged_attention(const float* q, const __half* __restrict__ k_cache,
                       const __half* __restrict__ v_cache, float* out,
                       const int* __restrict__ tok_seq, const int* __restrict__ tok_pos,
                       const int* __restrict__ tables, const int* __restrict__ table_off, int n_tokens,
                       int n_heads, int n_kv_heads, int head_dim, int block_size, int window) {
    const int t = blockIdx.x;
    const int h = blockIdx.y;
    if (t >= n_tokens || h >= n_heads) return;  // block-uniform

    const long long q_stride = (long long)n_heads * head_dim;  // q/out row length
    float* out_th = out + (long long)t * q_stride + (long long)h * head_dim;

    // Unsupported shapes or launch: make the output NaN rather than silently wrong.
    if (blockDim.x != ATTN_THREADS || head_dim <= 0 || head_dim > ATTN_MAX_HEAD_DIM || n_kv_heads <= 0 ||
        n_heads % n_kv_heads != 0 || block_size <= 0) {
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) out_th[d] = __int_as_float(0x7fc00000);
        return;
    }

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;

    const int kvh = h / (n_heads / n_kv_heads);
    const long long kv_stride = (long long)n_kv_heads * head_dim;  // cache row length
    const long long kv_head_off = (long long)kvh * head_dim;

    const int s = tok_seq[t];
    const int p = tok_pos[t];
    const int* table = tables + table_off[s];
    const int first = window > 0 ? max(0, p + 1 - window) : 0;
    const int n_keys = p - first + 1;  // >= 1
    const int n_tiles = (n_keys + ATTN_KPT - 1) / ATTN_KPT;

    // This lane's slice of q: dims lane + 32 j; dims >= head_dim are 0 (and never stored).
    const float* q_th = q + (long long)t * q_stride + (long long)h * head_dim;
    float qr[ATTN_DIMS_PER_LANE];
    float acc[ATTN_DIMS_PER_LANE];
#pragma unroll
    for (int j = 0; j < ATTN_DIMS_PER_LANE; ++j) {
        const int d = lane + 32 * j;
        qr[j] = d < head_dim ? q_th[d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY;  // running max of this warp's scores
    float l = 0.0f;       // running sum of exp(score - m)

    for (int tile = warp; tile < n_tiles; tile += ATTN_WARPS) {
        const int kp0 = first + tile * ATTN_KPT;  // <= p, since tile < n_tiles

        // Scores of the tile's keys (warp-uniform validity: all lanes share kp).
        float sc[ATTN_KPT];
        long long row_off[ATTN_KPT];  // element offset of (pool row, kv head) in the caches
#pragma unroll
        for (int u = 0; u < ATTN_KPT; ++u) {
            const int kp = kp0 + u;
            float part = 0.0f;
            row_off[u] = 0;
            if (kp <= p) {
                const long long row = (long long)table[kp / block_size] * block_size + kp % block_size;
                row_off[u] = row * kv_stride + kv_head_off;
                const __half* kr = k_cache + row_off[u];
#pragma unroll
                for (int j = 0; j < ATTN_DIMS_PER_LANE; ++j) {
                    const int d = lane + 32 * j;
                    if (d < head_dim) part += qr[j] * __half2float(kr[d]);
                }
            }
            // The reduction runs unconditionally (all 32 lanes participate).
            part = tp_warp_sum(part);
            sc[u] = kp <= p ? part : -INFINITY;
        }

        // Online softmax update with the tile's maximum. sc[0] is always a real key.
        float tile_max = sc[0];
#pragma unroll
        for (int u = 1; u < ATTN_KPT; ++u) tile_max = fmaxf(tile_max, sc[u]);
        const float m_new = fmaxf(m, tile_max);
        const float corr = m == -INFINITY ? 0.0f : expf(m - m_new);  // 0 on the warp's first tile
        l *= corr;
#pragma unroll
        for (int j = 0; j < ATTN_DIMS_PER_LANE; ++j) acc[j] *= corr;

#pragma unroll
        for (int u = 0; u < ATTN_KPT; ++u) {
            if (kp0 + u <= p) {  // warp-uniform
                const float pw = expf(sc[u] - m_new);
                l += pw;
                const __half* vr = v_cache + row_off[u];
#pragma unroll
                for (int j = 0; j < ATTN_DIMS_PER_LANE; ++j) {
                    const int d = lane + 32 * j;
                    if (d < head_dim) acc[j] += pw * __half2float(vr[d]);
                }
            }
        }
        m = m_new;
    }

    // Merge the warps' partial softmaxes.
    __shared__ float sm_m[ATTN_WARPS];
    __shared__ float sm_l[ATTN_WARPS];
    __shared__ float sm_acc[ATTN_WARPS][ATTN_MAX_HEAD_DIM];
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < ATTN_DIMS_PER_LANE; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) sm_acc[warp][d] = acc[j];
    }
    __syncthreads();

    float big_m = -INFINITY;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; ++w) big_m = fmaxf(big_m, sm_m[w]);  // finite: warp 0 has key(s)
    float wt[ATTN_WARPS];
    float denom = 0.0f;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; ++w) {
        wt[w] = sm_m[w] == -INFINITY ? 0.0f : expf(sm_m[w] - big_m);
        denom += wt[w] * sm_l[w];
    }
    const float inv_denom = 1.0f / denom;  // denom >= 1: the warp holding the max has l >= 1
    for (int d = threadIdx.x; d < head_dim; d += ATTN_THREADS) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) o += wt[w] * sm_acc[w][d];
        out_th[d] = o * inv_denom;
    }
}
