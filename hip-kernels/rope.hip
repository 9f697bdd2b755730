// Rotary embedding in place: `heads` slices per row starting at `offset + h * head_stride`, each
// 2*half wide (rope.h: the pairs and the angle).
#include "rope.h"

extern "C" __global__ void rope(float* x, const uint32_t* positions, const float* inv_freq, int cols, int heads, int head_stride,
                                int offset, int half, int interleaved, float scale) { ENGINE_GRID_DEP();
    // a row's heads × half pairs are spread over the grid's y blocks, one pair a thread: at batch
    // 1 a single block walking q's 4,096 pairs (each a sin and a cos) took ~14 µs
    int r = blockIdx.x;
    float pos = (float)positions[r];
    for (int idx = blockIdx.y * blockDim.x + threadIdx.x; idx < heads * half; idx += gridDim.y * blockDim.x) {
        int h = idx / half, i = idx % half;
        rope_pair(x + (int64_t)r * cols + offset + h * head_stride, i, half, interleaved, inv_freq[i], pos, scale);
    }
}
