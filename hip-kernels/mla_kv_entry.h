// One new token's MLA cache entry by a block (mla_kv_entry.hip's kernels, and the tail blocks of
// linear.hip's q_b GEMV that write the entries in the same launch): row r of `x` (kv_a's output,
// [T, entry] = [latent n | rope 2·half from `offset`]) gets the norm over its first n columns and
// the rotary embedding, both in place with rms_norm_cols' and rope's arithmetic (norm_row.h,
// rope.h), then goes to cache slot slots[r] of `layer` as kv_write (f32) or kv_write_bf16 (rounded
// to nearest even) writes it.
#pragma once
#include "norm_row.h"
#include "rope.h"
#include "bf16.h"

__device__ __forceinline__ void kv_store(float* d, float v) { *d = v; }
__device__ __forceinline__ void kv_store(uint16_t* d, float v) { *d = (uint16_t)bf16_rne(v); }

template <typename CT>
__device__ __forceinline__ void mla_kv_entry_row(int r, float* x, const float* w, int n, float eps, const uint32_t* positions, const float* inv_freq, int offset, int half,
                                                 int interleaved, float scale, CT* kv, const uint32_t* slots, int layer, int num_slots, int entry) {
    float* row = x + (int64_t)r * entry;
    rms_norm_row<2>(row, w, row, n, eps); // two float4s a thread at most (512 latents: one), wider rows the scalar loop
    __syncthreads(); // the normed columns written by every thread before any thread reads the row
    const float pos = (float)positions[r];
    for (int i = threadIdx.x; i < half; i += blockDim.x) rope_pair(row + offset, i, half, interleaved, inv_freq[i], pos, scale);
    __syncthreads();
    CT* dst = kv + ((int64_t)layer * num_slots + slots[r]) * entry;
    for (int e = threadIdx.x; e < entry; e += blockDim.x) kv_store(dst + e, row[e]);
}
