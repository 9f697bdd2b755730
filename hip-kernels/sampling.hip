// Token selection on the GPU, one block per row of logits (applied in place):
//   1. repetition (HF), frequency and presence (OpenAI) penalties over the row's listed tokens;
//   2. greedy (temperature 0): argmax, ties to the lower id;
//   3. otherwise w = exp((l - max) / T); the kept set is {w >= thr} with thr the largest of the
//      top-k threshold, the top-p threshold (over the top-k set) and min_p (w_max is 1), each found
//      by bisection on the value; the token is where u * Σ kept w falls in index order.
// Matches sampling/sampler.rs in distribution (the CPU walks tokens by
// probability, so the same u can pick a different token).
#include "common.h"

#define SBLOCK 1024

// f(l[i], i) over this thread's share of the row, in ascending order, with eight loads in flight
// before the first is used (one load at a time, 127 a thread for a 129,280-token vocabulary, made
// a greedy pick ~57 µs): 16-byte loads (i = 4·(threadIdx.x + j·blockDim.x) + 0..3) where the row
// allows them, else i = threadIdx.x + j·blockDim.x; f may write l[i].
template <class F>
__device__ __forceinline__ void row_walk(float* l, int V, F f) {
    if (V % 4 == 0 && (unsigned long long)l % 16 == 0) {
        const int V4 = V / 4;
        for (int i0 = threadIdx.x; i0 < V4; i0 += 8 * blockDim.x) {
            float4 v[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int i = i0 + j * (int)blockDim.x;
                v[j] = i < V4 ? ((const float4*)l)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int i = i0 + j * (int)blockDim.x;
                if (i < V4) {
                    f(v[j].x, 4 * i);
                    f(v[j].y, 4 * i + 1);
                    f(v[j].z, 4 * i + 2);
                    f(v[j].w, 4 * i + 3);
                }
            }
        }
        return;
    }
    for (int i0 = threadIdx.x; i0 < V; i0 += 8 * blockDim.x) {
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            int i = i0 + j * (int)blockDim.x;
            v[j] = i < V ? l[i] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            int i = i0 + j * (int)blockDim.x;
            if (i < V) f(v[j], i);
        }
    }
}

// The same over the contiguous range [a, b), ascending; stops once f returns true.
template <class F>
__device__ __forceinline__ void range_walk(const float* l, int a, int b, F f) {
    for (int i0 = a; i0 < b; i0 += 8) {
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = i0 + j < b ? l[i0 + j] : 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j)
            if (i0 + j < b && f(v[j], i0 + j)) return;
    }
}

extern "C" __global__ void sample_rows(float* logits, int V, const float* temperature, const int* top_k, const float* top_p,
                                       const float* min_p, const float* rep, const float* freq, const float* pres,
                                       const int* pen_off, const int* pen_tok, const int* pen_cnt, const uint8_t* pen_prompt,
                                       const float* uniform, int* out) { ENGINE_GRID_DEP();
    __shared__ float sh[SBLOCK / 32];
    __shared__ int shi[SBLOCK / 32];
    __shared__ float scan[SBLOCK];
    int r = blockIdx.x;
    float* l = logits + (int64_t)r * V;
    // 1. penalties (each listed token once)
    for (int j = pen_off[r] + threadIdx.x; j < pen_off[r + 1]; j += blockDim.x) {
        int t = pen_tok[j], cnt = pen_cnt[j];
        float x = l[t];
        if (rep[r] != 1.0f && (cnt > 0 || pen_prompt[j])) x = x > 0.f ? x / rep[r] : x * rep[r];
        if (cnt > 0) x -= freq[r] * (float)cnt + pres[r];
        l[t] = x;
    }
    __syncthreads();
    // 2. greedy
    float T = temperature[r];
    if (T == 0.0f || top_k[r] == 1) {
        float best = -ENGINE_INF;
        int bi = 0x7fffffff;
        row_walk(l, V, [&](float x, int i) {
            if (x > best) { best = x; bi = i; }
        });
        float m = block_reduce(best, sh, EngineMax{}, -ENGINE_INF);
        int cand = best == m ? bi : 0x7fffffff;
        // lowest index among the maxima
        int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
        for (int o = WARP / 2; o > 0; o >>= 1) cand = min(cand, __shfl_xor(cand, o, WARP));
        __syncthreads();
        if (lane == 0) shi[w] = cand;
        __syncthreads();
        if (threadIdx.x == 0) {
            int b = 0x7fffffff;
            for (int i = 0; i < nw; ++i) b = min(b, shi[i]);
            out[r] = b;
        }
        return;
    }
    // 3. weights relative to the max
    float mx = -ENGINE_INF;
    row_walk(l, V, [&](float x, int) { mx = fmaxf(mx, x); });
    mx = block_reduce(mx, sh, EngineMax{}, -ENGINE_INF);
    float invT = 1.0f / T;
    row_walk(l, V, [&](float x, int i) { l[i] = expf((x - mx) * invT); });
    __syncthreads();
    float thr = 0.f;
    int k = top_k[r];
    if (k > 0 && k < V) {
        float lo = 0.f, hi = 1.0f; // count(w >= lo) >= k always holds
        for (int it = 0; it < 40; ++it) {
            float mid = 0.5f * (lo + hi);
            float c = 0.f;
            row_walk(l, V, [&](float x, int) { c += x >= mid ? 1.f : 0.f; });
            c = block_reduce(c, sh, EngineSum{}, 0.f);
            if (c >= (float)k) lo = mid; else hi = mid;
        }
        thr = lo;
    }
    if (top_p[r] < 1.0f) {
        float z = 0.f;
        row_walk(l, V, [&](float x, int) { z += x >= thr ? x : 0.f; });
        z = block_reduce(z, sh, EngineSum{}, 0.f);
        float lo = thr, hi = 1.0f; // mass(w >= lo) >= p z
        for (int it = 0; it < 40; ++it) {
            float mid = 0.5f * (lo + hi);
            float s = 0.f;
            row_walk(l, V, [&](float x, int) { s += x >= mid ? x : 0.f; });
            s = block_reduce(s, sh, EngineSum{}, 0.f);
            if (s >= top_p[r] * z) lo = mid; else hi = mid;
        }
        thr = lo;
    }
    thr = fmaxf(thr, min_p[r]);
    // 4. inverse CDF in index order over contiguous chunks
    int per = (V + blockDim.x - 1) / blockDim.x;
    int a = threadIdx.x * per, b = min(V, a + per);
    float mine = 0.f;
    range_walk(l, a, b, [&](float x, int) {
        mine += x >= thr ? x : 0.f;
        return false;
    });
    scan[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        float acc = 0.f;
        for (int i = 0; i < (int)blockDim.x; ++i) {
            float v = scan[i];
            scan[i] = acc;
            acc += v;
        }
        sh[0] = acc;
    }
    __syncthreads();
    float target = uniform[r] * sh[0];
    float start = scan[threadIdx.x];
    if (target >= start && target < start + mine) {
        float acc = start;
        int pick = -1, last = -1;
        range_walk(l, a, b, [&](float x, int i) {
            if (x < thr) return false;
            last = i;
            acc += x;
            if (target < acc) pick = i;
            return pick >= 0;
        });
        out[r] = pick >= 0 ? pick : last;
    }
    // rounding can leave target past the total: the last kept token
    __syncthreads();
    if (threadIdx.x == 0 && target >= sh[0]) {
        for (int i = V - 1; i >= 0; --i)
            if (l[i] >= thr) { out[r] = i; break; }
    }
}
