// The new tokens' MLA cache entries in one launch: decode ran RMSNorm over the latent, RoPE on its
// rope columns and the cache write as three one-block kernels a layer (~3 µs each at batch 1 on the
// H200). Row r of `x` (kv_a's output, [T, entry] = [latent n | rope 2·half from `offset`]) gets
// the norm over its first n columns and the rotary embedding, both in place with rms_norm_cols' and
// rope's arithmetic (norm_row.h, rope.h), then goes to cache slot slots[r] of `layer` as kv_write
// (f32) or kv_write_bf16 (rounded to nearest even) writes it (mla_kv_entry.h). One block a row.
#include "mla_kv_entry.h"

extern "C" __global__ void __launch_bounds__(256) mla_kv_entry(float* x, const float* w, int n, float eps, const uint32_t* positions, const float* inv_freq, int offset,
                                                               int half, int interleaved, float scale, float* kv, const uint32_t* slots, int layer,
                                                               int num_slots, int entry) { ENGINE_GRID_DEP();
    mla_kv_entry_row(blockIdx.x, x, w, n, eps, positions, inv_freq, offset, half, interleaved, scale, kv, slots, layer, num_slots, entry);
}
extern "C" __global__ void __launch_bounds__(256) mla_kv_entry_bf16(float* x, const float* w, int n, float eps, const uint32_t* positions, const float* inv_freq,
                                                                    int offset, int half, int interleaved, float scale, uint16_t* kv, const uint32_t* slots,
                                                                    int layer, int num_slots, int entry) { ENGINE_GRID_DEP();
    mla_kv_entry_row(blockIdx.x, x, w, n, eps, positions, inv_freq, offset, half, interleaved, scale, kv, slots, layer, num_slots, entry);
}
