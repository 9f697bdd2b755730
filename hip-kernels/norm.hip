// RMSNorm: plain, with the residual add fused in front, and in place over a column range. One
// block per row (norm_row.h).
#include "norm_row.h"

extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int cols, float eps) { ENGINE_GRID_DEP();
    int64_t r = blockIdx.x;
    rms_norm_row(x + r * cols, w, out + r * cols, cols, eps);
}

// residual += x; out = rmsnorm(residual)
extern "C" __global__ void add_rms_norm(const float* x, float* residual, const float* w, float* out, int cols, float eps) { ENGINE_GRID_DEP();
    int64_t r = blockIdx.x;
    float* res = residual + r * cols;
    const float* xr = x + r * cols;
    if (norm_vec_ok(cols, res, xr, out) && (unsigned long long)w % 16 == 0) {
        int n4 = cols / 4;
        float4 v[NORM_VEC], a[NORM_VEC];
#pragma unroll
        for (int i = 0; i < NORM_VEC; ++i) {
            int c = threadIdx.x + i * blockDim.x;
            if (c < n4) {
                v[i] = ((const float4*)res)[c];
                a[i] = ((const float4*)xr)[c];
            }
        }
#pragma unroll
        for (int i = 0; i < NORM_VEC; ++i) {
            int c = threadIdx.x + i * blockDim.x;
            if (c < n4) {
                v[i] = make_float4(v[i].x + a[i].x, v[i].y + a[i].y, v[i].z + a[i].z, v[i].w + a[i].w);
                ((float4*)res)[c] = v[i];
            }
        }
        scale_store4(v, w, out + r * cols, n4, sumsq4(v, n4), cols, eps);
        return;
    }
#pragma unroll 4
    for (int c = threadIdx.x; c < cols; c += blockDim.x) res[c] += xr[c];
    __syncthreads();
    rms_norm_row(res, w, out + r * cols, cols, eps);
}

// Columns [start, start + n) of each row, in place.
extern "C" __global__ void rms_norm_cols(float* x, const float* w, int cols, int start, int n, float eps) { ENGINE_GRID_DEP();
    float* row = x + (int64_t)blockIdx.x * cols + start;
    rms_norm_row(row, w, row, n, eps);
}
