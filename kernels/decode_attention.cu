// Fused single-token decode attention over a KV cache, grouped-query, and
// the batched decode step's kernels (RoPE + cache append, attention over
// every sequence's cache in one launch); see the second half of the file.
//
// One new query token of one sequence attends to the `len` cached positions
// of its key/value head: scores, softmax and the weighted sum of values in one
// launch, reading the cache in place (no copy of the narrowed cache, no
// [heads, len] score tensor in device memory). candle's path takes five
// launches for the same work (scale, QK^T, softmax, contiguous V, PV).
//
// Layout (all row-major, element strides):
//   q    [nh, hd]                      contiguous
//   k, v head g, position j at  g * head_stride + j * hd   (hd contiguous)
//   out  [nh, hd]                      contiguous
// Query head h reads key/value head h / (nh / nkv).
//
// Grid: one block per query head; block: WARPS warps. Each warp walks keys
// warp, warp + WARPS, ... with an online softmax (running max, sum and
// value accumulator); lane l owns dimensions [l * per_lane, (l + 1) * per_lane).
// The warps' partial results are merged through shared memory at the end.
// Arithmetic is f32 whatever the storage type. hd must be a multiple of 32
// and at most 32 * MAX_PER_LANE (the Rust side checks before launching).

#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#define WARPS 16
#define MAX_PER_LANE 8

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void store(float *p, float x) { *p = x; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float x) { *p = __float2bfloat16(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One query head over `len` positions of its key/value head: kh and vh point
// at position 0 of that head, rows hd apart; the block writes oh[0..hd).
template <typename T>
__device__ void attend_head(const T *__restrict__ qh, const T *__restrict__ kh,
                            const T *__restrict__ vh, T *__restrict__ oh, int hd, int len,
                            float scale) {
  __shared__ float part_max[WARPS];
  __shared__ float part_sum[WARPS];
  __shared__ float part_acc[WARPS][32 * MAX_PER_LANE];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int per_lane = hd >> 5;
  const int d0 = lane * per_lane;

  float qr[MAX_PER_LANE];
  float acc[MAX_PER_LANE];
#pragma unroll
  for (int e = 0; e < MAX_PER_LANE; ++e) {
    qr[e] = e < per_lane ? to_f32(qh[d0 + e]) * scale : 0.f;
    acc[e] = 0.f;
  }
  kh += d0;
  vh += d0;

  float run_max = -INFINITY;
  float run_sum = 0.f;
  for (int j = warp; j < len; j += WARPS) {
    const T *kr = kh + (long long)j * hd;
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; ++e)
      if (e < per_lane) dot += qr[e] * to_f32(kr[e]);
    dot = warp_sum(dot);
    const float new_max = fmaxf(run_max, dot);
    const float corr = __expf(run_max - new_max); // 0 on the first key
    const float p = __expf(dot - new_max);
    run_sum = run_sum * corr + p;
    const T *vr = vh + (long long)j * hd;
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; ++e)
      if (e < per_lane) acc[e] = acc[e] * corr + p * to_f32(vr[e]);
    run_max = new_max;
  }

  if (lane == 0) {
    part_max[warp] = run_max;
    part_sum[warp] = run_sum;
  }
#pragma unroll
  for (int e = 0; e < MAX_PER_LANE; ++e)
    if (e < per_lane) part_acc[warp][d0 + e] = acc[e];
  __syncthreads();

  float m = -INFINITY;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) m = fmaxf(m, part_max[w]);
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float s = 0.f, a = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      // A warp that saw no key has max -inf and contributes nothing.
      const float f = part_max[w] == -INFINITY ? 0.f : __expf(part_max[w] - m);
      s += part_sum[w] * f;
      a += part_acc[w][d] * f;
    }
    store(oh + d, a / s);
  }
}

// One sequence: grid (nh), block WARPS * 32.
template <typename T>
__device__ void decode_attention(const T *q, const T *k, const T *v, T *out, int nh, int nkv,
                                 int hd, int len, long long head_stride, float scale) {
  const int h = blockIdx.x;
  const long long g = h / (nh / nkv);
  attend_head(q + (long long)h * hd, k + g * head_stride, v + g * head_stride,
              out + (long long)h * hd, hd, len, scale);
}

// ---------------------------------------------------------------------------
// A decode step of n sequences, each with its own KV cache, in two launches
// per layer whatever n is (the candle path takes about seven per sequence).
//
// meta: int64 [4, n] for the layer: row 0 the address of each sequence's key
// cache [nkv, cap, hd], row 1 its value cache, row 2 its position (tokens
// already cached), row 3 its capacity cap.

// RoPE (rotate-half, as Qwen2) on the new queries and keys at each
// sequence's position; the rotated keys and the values are written into the
// caches at that position, the rotated queries to q_out.
// q [n, nh * hd], k and v [n, nkv * hd], q_out like q: contiguous.
// cos, sin [positions, hd / 2]. Grid (n, nh + nkv), block hd / 2.
template <typename T>
__device__ void rope_append(const T *__restrict__ q, const T *__restrict__ k,
                            const T *__restrict__ v, const T *__restrict__ cos,
                            const T *__restrict__ sin, const long long *__restrict__ meta,
                            T *__restrict__ q_out, int n, int nh, int nkv, int hd) {
  const int s = blockIdx.x;
  const int head = blockIdx.y;
  const int half = hd >> 1;
  const int i = threadIdx.x;
  if (i >= half) return;
  const long long pos = meta[2 * n + s];
  const long long cap = meta[3 * n + s];
  const float c = to_f32(cos[pos * half + i]);
  const float sn = to_f32(sin[pos * half + i]);
  if (head < nh) {
    const T *x = q + ((long long)s * nh + head) * hd;
    T *o = q_out + ((long long)s * nh + head) * hd;
    const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
    store(o + i, x1 * c - x2 * sn);
    store(o + i + half, x2 * c + x1 * sn);
  } else {
    const int g = head - nh;
    const long long row = ((long long)g * cap + pos) * hd;
    T *kc = reinterpret_cast<T *>(meta[s]) + row;
    T *vc = reinterpret_cast<T *>(meta[n + s]) + row;
    const T *x = k + ((long long)s * nkv + g) * hd;
    const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
    store(kc + i, x1 * c - x2 * sn);
    store(kc + i + half, x2 * c + x1 * sn);
    const T *y = v + ((long long)s * nkv + g) * hd;
    vc[i] = y[i];
    vc[i + half] = y[i + half];
  }
}

// Attention of every sequence's rotated query over its cache, positions
// 0..=pos. q, out [n, nh * hd] contiguous. Grid (nh, n), block WARPS * 32.
template <typename T>
__device__ void decode_attention_batch(const T *q, const long long *meta, T *out, int n,
                                       int nh, int nkv, int hd, float scale) {
  const int h = blockIdx.x;
  const int s = blockIdx.y;
  const long long g = h / (nh / nkv);
  const long long cap = meta[3 * n + s];
  const int len = (int)meta[2 * n + s] + 1;
  const T *kc = reinterpret_cast<const T *>(meta[s]) + g * cap * hd;
  const T *vc = reinterpret_cast<const T *>(meta[n + s]) + g * cap * hd;
  const long long row = ((long long)s * nh + h) * hd;
  attend_head(q + row, kc, vc, out + row, hd, len, scale);
}

#define KERNELS(T, NAME)                                                                     \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                  \
      decode_attention_##NAME(const T *q, const T *k, const T *v, T *out, int nh, int nkv,  \
                              int hd, int len, long long head_stride, float scale) {        \
    decode_attention(q, k, v, out, nh, nkv, hd, len, head_stride, scale);                   \
  }                                                                                          \
  extern "C" __global__ void rope_append_##NAME(const T *q, const T *k, const T *v,         \
                                                const T *cos, const T *sin,                 \
                                                const long long *meta, T *q_out, int n,     \
                                                int nh, int nkv, int hd) {                  \
    rope_append(q, k, v, cos, sin, meta, q_out, n, nh, nkv, hd);                            \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                  \
      decode_attention_batch_##NAME(const T *q, const long long *meta, T *out, int n,       \
                                    int nh, int nkv, int hd, float scale) {                 \
    decode_attention_batch(q, meta, out, n, nh, nkv, hd, scale);                            \
  }

KERNELS(__nv_bfloat16, bf16)
KERNELS(float, f32)
