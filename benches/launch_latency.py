"""Kernel-boundary microbenchmark: what programmatic dependent launch (PDL, sm_90) saves between
dependent kernels, in a stream and in a CUDA graph. A chain of N kernels, each reading what the one
before wrote; kernels begin as the engine's do (hip-kernels/common.h ENGINE_GRID_DEP: griddepcontrol
.wait, then .launch_dependents). Shapes: one block of 256 threads (the engine's norm / routing
kernels), and a GEMV-like grid (132 × 2 blocks, each streaming 64 KB of its own "weights" and the
previous kernel's 7,168-float vector), the weights' loads either after the wait or issued before it
(PRE: what a kernel may do before its predecessor is done: read memory no earlier kernel writes).
NVRTC + driver API (ctypes), torch for memory, events and graph capture. Usage on a CUDA machine:
`python3 benches/launch_latency.py`. Results: docs/BENCHMARKS.md ("seventeenth session")."""
import ctypes, os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvrtc_module import Module, compile_cubin, driver  # noqa: E402
cu = driver()
SRC = r'''
#define DEP() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
extern "C" __global__ void tiny(const float* x, float* y) { DEP(); if (threadIdx.x == 0) y[0] = x[0] + 1.f; }
// GEMV-like: block b reads its 32 KB of W (16-byte loads, 8 a thread) and x[0..7168); writes y
template <bool PRE> __device__ void gv(const uint4* W, const float* x, float* y) {
  const uint4* w = W + (size_t)blockIdx.x * 2048; uint4 v[8]; float acc = 0.f;
  if (PRE) {
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = __ldg(w + threadIdx.x + u * 256);
  }
  DEP();
  if (!PRE) {
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = __ldg(w + threadIdx.x + u * 256);
  }
  for (int i = threadIdx.x; i < 7168; i += 256) acc += x[i];
#pragma unroll
  for (int u = 0; u < 8; ++u) acc += __uint_as_float(v[u].x & 0x3f800000u);
  const int i = blockIdx.x * 256 + threadIdx.x;
  if (i < 7168) y[i] = x[i] + acc * 1e-9f;
}
extern "C" __global__ void __launch_bounds__(256) gemv_after(const uint4* W, const float* x, float* y) { gv<false>(W, x, y); }
extern "C" __global__ void __launch_bounds__(256) gemv_pre(const uint4* W, const float* x, float* y) { gv<true>(W, x, y); }
'''
src = SRC.encode()
cub = compile_cubin(src, b'll.cu')
torch.zeros(1, device='cuda')
fn = Module(cub).fn
class Attr(ctypes.Structure):
    _fields_ = [('id', ctypes.c_int), ('pad', ctypes.c_char * 4), ('val', ctypes.c_int), ('rest', ctypes.c_char * 60)]
class Cfg(ctypes.Structure):
    _fields_ = [('g', ctypes.c_uint * 3), ('b', ctypes.c_uint * 3), ('smem', ctypes.c_uint), ('stream', ctypes.c_void_p), ('attrs', ctypes.POINTER(Attr)), ('n', ctypes.c_uint)]
attr = Attr(); attr.id = 6; attr.val = 1  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
def launch(f, grid, args, pdl):
    arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    c = Cfg(); c.g[:] = [grid, 1, 1]; c.b[:] = [256, 1, 1]; c.smem = 0
    c.stream = torch.cuda.current_stream().cuda_stream; c.attrs = ctypes.pointer(attr); c.n = 1 if pdl else 0
    r = cu.cuLaunchKernelEx(ctypes.byref(c), f, arr, None); assert r == 0, r
N = 200
bufs = [torch.randn(7168, device='cuda') for _ in range(N + 1)]
# each kernel of the chain its own 8.6 MB of weights (1.7 GB in all: they stream from HBM, as a
# model's do)
W = torch.randint(0, 1 << 30, (N * 264 * 2048 * 4,), dtype=torch.int32, device='cuda')
keep = []
def chain(f, grid, pdl, weights):
    for i in range(N):
        a = ([ctypes.c_void_p(W.data_ptr() + i * 264 * 2048 * 16)] if weights else []) + [ctypes.c_void_p(bufs[i].data_ptr()), ctypes.c_void_p(bufs[i + 1].data_ptr())]
        keep.append(a); launch(f, grid, a, pdl)
def timeit(go, reps=20):
    go(); torch.cuda.synchronize(); ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); go(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1e3 / N)
    ts.sort(); return ts[len(ts) // 2]
for name, grid, weights in [('tiny', 1, False), ('gemv_after', 264, True), ('gemv_pre', 264, True)]:
    f = fn(name.encode())
    for pdl in (False, True):
        s = timeit(lambda: chain(f, grid, pdl, weights))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            chain(f, grid, pdl, weights)
        t = timeit(lambda: g.replay())
        print('%-10s grid %3d pdl %d: stream %.2f us a kernel, graph %.2f us a kernel' % (name, grid, pdl, s, t))
