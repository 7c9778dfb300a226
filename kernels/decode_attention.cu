// Fused single-token decode attention over a KV cache, grouped-query.
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

template <typename T>
__device__ void decode_attention(const T *__restrict__ q, const T *__restrict__ k,
                                 const T *__restrict__ v, T *__restrict__ out, int nh,
                                 int nkv, int hd, int len, long long head_stride,
                                 float scale) {
  __shared__ float part_max[WARPS];
  __shared__ float part_sum[WARPS];
  __shared__ float part_acc[WARPS][32 * MAX_PER_LANE];

  const int h = blockIdx.x;
  const int g = h / (nh / nkv);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int per_lane = hd >> 5;
  const int d0 = lane * per_lane;

  float qr[MAX_PER_LANE];
  float acc[MAX_PER_LANE];
#pragma unroll
  for (int e = 0; e < MAX_PER_LANE; ++e) {
    qr[e] = e < per_lane ? to_f32(q[(long long)h * hd + d0 + e]) * scale : 0.f;
    acc[e] = 0.f;
  }
  const T *kh = k + (long long)g * head_stride + d0;
  const T *vh = v + (long long)g * head_stride + d0;

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
    store(out + (long long)h * hd + d, a / s);
  }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
    decode_attention_bf16(const __nv_bfloat16 *q, const __nv_bfloat16 *k,
                          const __nv_bfloat16 *v, __nv_bfloat16 *out, int nh, int nkv,
                          int hd, int len, long long head_stride, float scale) {
  decode_attention(q, k, v, out, nh, nkv, hd, len, head_stride, scale);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
    decode_attention_f32(const float *q, const float *k, const float *v, float *out,
                         int nh, int nkv, int hd, int len, long long head_stride,
                         float scale) {
  decode_attention(q, k, v, out, nh, nkv, hd, len, head_stride, scale);
}
