// Rotary embedding in place: `heads` slices per row starting at `offset + h * head_stride`, each
// 2*half wide (rope.h: the pairs and the angle).
#include "rope.h"

extern "C" __global__ void rope(float* x, const uint32_t* positions, const float* inv_freq, int cols, int heads, int head_stride,
                                int offset, int half, int interleaved, float scale) { ENGINE_GRID_DEP();
    // a row's heads × half pairs are spread over the grid's y blocks, one pair a thread: at batch
    // 1 a single block walking q's 4,096 pairs (each a sin and a cos) took ~14 µs. Where the
    // grid's stride over the pairs is a multiple of half (the host's launch for many rows: one y
    // block), a thread's pairs share their index i, so its angle's cos and sin are made once for
    // all its heads (the same values: they depend on the row and i only)
    int r = blockIdx.x;
    float pos = (float)positions[r];
    const int stride = gridDim.y * blockDim.x, first = blockIdx.y * blockDim.x + threadIdx.x;
    if (stride % half == 0) {
        if (first >= heads * half) return;
        const int i = first % half;
        const float2 cs = rope_cs(inv_freq[i], pos, scale);
        for (int idx = first; idx < heads * half; idx += stride) rope_apply(x + (int64_t)r * cols + offset + (idx / half) * head_stride, i, half, interleaved, cs);
        return;
    }
    for (int idx = first; idx < heads * half; idx += stride) {
        int h = idx / half, i = idx % half;
        rope_pair(x + (int64_t)r * cols + offset + h * head_stride, i, half, interleaved, inv_freq[i], pos, scale);
    }
}
