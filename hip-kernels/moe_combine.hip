// MoE output of the prefill path (engine/backend/gpu/moe_prefill.rs): each token's routed pairs
// were computed as rows of the experts' segments; out[t] += Σ_j w[t·k + j] · rows[pair_row[t·k + j]],
// the sum in the order of the token's top-k list (deterministic; pairs routed to another rank's
// experts have pair_row −1), then added to out once (zeros, or the shared experts' output). A
// block per token, 4 columns a thread.
#include "common.h"

extern "C" __global__ void __launch_bounds__(256) moe_combine(const float* __restrict__ rows, const int* __restrict__ pair_row, const float* __restrict__ w,
                                                              float* __restrict__ out, int k, int hidden) { ENGINE_GRID_DEP();
    int t = blockIdx.x;
    for (int c = threadIdx.x * 4; c < hidden; c += blockDim.x * 4) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int j = 0; j < k; ++j) {
            int r = pair_row[t * k + j];
            if (r < 0) continue;
            float wj = w[t * k + j];
            float4 v = *(const float4*)(rows + (int64_t)r * hidden + c);
            acc.x += wj * v.x;
            acc.y += wj * v.y;
            acc.z += wj * v.z;
            acc.w += wj * v.w;
        }
        float4* o = (float4*)(out + (int64_t)t * hidden + c);
        const float4 y = *o;
        *o = make_float4(y.x + acc.x, y.y + acc.y, y.z + acc.z, y.w + acc.w);
    }
}
