// RMSNorm: plain, with the residual add fused in front, and in place over a column range.
#include "common.h"

__device__ void rms_norm_row(const float* x, const float* w, float* out, int n, float eps) {
    float ss = 0.f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) ss += x[c] * x[c];
    ss = block_sum(ss);
    float r = rsqrtf(ss / (float)n + eps);
    for (int c = threadIdx.x; c < n; c += blockDim.x) out[c] = w[c] * (x[c] * r);
}

extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int cols, float eps) {
    int64_t r = blockIdx.x;
    rms_norm_row(x + r * cols, w, out + r * cols, cols, eps);
}

// residual += x; out = rmsnorm(residual)
extern "C" __global__ void add_rms_norm(const float* x, float* residual, const float* w, float* out, int cols, float eps) {
    int64_t r = blockIdx.x;
    float* res = residual + r * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) res[c] += x[r * cols + c];
    __syncthreads();
    rms_norm_row(res, w, out + r * cols, cols, eps);
}

// Columns [start, start + n) of each row, in place.
extern "C" __global__ void rms_norm_cols(float* x, const float* w, int cols, int start, int n, float eps) {
    float* row = x + (int64_t)blockIdx.x * cols + start;
    float ss = 0.f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) ss += row[c] * row[c];
    ss = block_sum(ss);
    float r = rsqrtf(ss / (float)n + eps);
    __syncthreads();
    for (int c = threadIdx.x; c < n; c += blockDim.x) row[c] = w[c] * (row[c] * r);
}
