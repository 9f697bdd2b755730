"""Streaming-read microbenchmark for the MLA decode kernel's access pattern (one H200 block an SM
reading a contiguous run of 1,152-byte cache entries): plain 16-byte loads against per-key (or
per-run) cp.async.bulk copies into a ring of shared-memory stages, no arithmetic. Compiles its
kernels with NVRTC and launches them through the driver API (ctypes); torch for memory and
events. Usage on a CUDA machine: `python3 benches/stream_read.py` (event times, 50 repeats), or
under ncu for kernel times: `REPS=2 ncu --kernel-name regex:"^(ld|bulk)$" --metrics
gpu__time_duration.sum,dram__bytes_read.sum python3 benches/stream_read.py`. Results:
docs/BENCHMARKS.md ("sixteenth session")."""
import ctypes, os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvrtc_module import Module, compile_cubin, driver, event_median_us  # noqa: E402
cu = driver()
SRC = r'''
#define ENTRY_B 1152
extern "C" __device__ __forceinline__ unsigned sm(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ bool tw(unsigned bar, unsigned par) { unsigned ok; asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(ok) : "r"(bar), "r"(par) : "memory"); return ok; }
// per-key bulk copies (KPC keys per copy when contiguous), NS stages of SK keys; each block reads keys [b*per, (b+1)*per)
extern "C" __global__ void __launch_bounds__(256,1) bulk(const char* kv, const unsigned* slots, int per, int SK, int NS, int KPC, float* out) {
  extern __shared__ __align__(128) unsigned char sh[];
  uint64_t* bar = (uint64_t*)sh; unsigned char* buf = sh + 1024;
  int tid = threadIdx.x; const unsigned* sl = slots + blockIdx.x * per;
  if (tid < NS) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(sm(&bar[tid])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); __syncthreads();
  int nst = per / SK; float acc = 0;
  auto issue = [&](int s) { if (s >= nst) return; int cpk = SK / KPC; // copies a stage
     if (tid == 0) asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(sm(&bar[s % NS])), "r"(SK * ENTRY_B) : "memory");
     if (tid < cpk) { unsigned slot = sl[s * SK + tid * KPC];
       asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" :: "r"(sm(buf + (size_t)(s % NS) * SK * ENTRY_B + tid * KPC * ENTRY_B)), "l"(kv + (size_t)slot * ENTRY_B), "r"(KPC * ENTRY_B), "r"(sm(&bar[s % NS])) : "memory"); } };
  for (int s = 0; s < NS; ++s) issue(s);
  for (int s = 0; s < nst; ++s) {
    while (!tw(sm(&bar[s % NS]), (s / NS) & 1)) {}
    acc += ((float*)(buf + (size_t)(s % NS) * SK * ENTRY_B))[tid];
    __syncthreads();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    issue(s + NS);
  }
  if (acc == 12345.f) out[0] = acc;
}
// plain 16-byte loads, UNR in flight a thread
extern "C" __global__ void __launch_bounds__(256,1) ld(const uint4* kv, int per16, float* out) {
  const uint4* p = kv + (size_t)blockIdx.x * per16; unsigned x = 0;
  for (int i = threadIdx.x; i < per16; i += 256 * 8) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = i + u * 256 < per16 ? __ldg(p + i + u * 256) : make_uint4(0,0,0,0);
#pragma unroll
    for (int u = 0; u < 8; ++u) x ^= v[u].x ^ v[u].w;
  }
  if (x == 12345) out[0] = x;
}
'''
src = b'typedef unsigned long long uint64_t;\n' + SRC.encode()
cub = compile_cubin(src, b'mb.cu')
torch.zeros(1, device='cuda')
fn = Module(cub).fn
fb, fl = fn(b'bulk'), fn(b'ld')
assert cu.cuFuncSetAttribute(fb, 8, 227 * 1024) == 0  # MAX_DYNAMIC_SHARED_SIZE_BYTES
def launch(f, grid, smem, args):
    arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    r = cu.cuLaunchKernel(f, grid, 1, 1, 256, 1, 1, smem, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), arr, None); assert r == 0, r
ENTRY = 1152
nslots = 1 << 20  # 1.2 GB: the largest run below reads all of it
kv = torch.randint(0, 255, (nslots * ENTRY,), dtype=torch.uint8, device='cuda')
out = torch.zeros(4, device='cuda')
REPS = int(os.environ.get('REPS', '50'))
def timeit(go, nbytes, reps=None):
    """median µs of `reps` runs after a warm-up, L2 flushed before each; and TB/s"""
    m = event_median_us(go, reps or REPS, torch.empty(200 << 20, dtype=torch.uint8, device='cuda'))
    return m, nbytes / m / 1e6
def run_bulk(blocks, per, SK, NS, KPC, order):
    slots = torch.arange(blocks * per, dtype=torch.int32, device='cuda')
    if order == 'rev': slots = slots.view(blocks, per).flip(1).reshape(-1).contiguous()
    if order == 'rand': slots = torch.randperm(nslots, device='cuda')[:blocks * per].int()
    smem = 1024 + SK * NS * ENTRY
    args = [ctypes.c_void_p(kv.data_ptr()), ctypes.c_void_p(slots.data_ptr()), ctypes.c_int(per), ctypes.c_int(SK), ctypes.c_int(NS), ctypes.c_int(KPC), ctypes.c_void_p(out.data_ptr())]
    return timeit(lambda: launch(fb, blocks, smem, args), blocks * per * ENTRY)
print('copy (torch) 1 GiB:', end=' ')
x = torch.empty(1 << 30, dtype=torch.uint8, device='cuda'); y = torch.empty_like(x)
m, _ = timeit(lambda: y.copy_(x), 2 << 30, 10 if REPS > 10 else REPS); print('%.1f us %.0f GB/s (read+write)' % (m, 2 * (1 << 30) / m / 1e3))
del x, y
for blocks, per in [(128, 1024), (128, 2048), (128, 4096), (128, 8192)]:
    per16 = per * ENTRY // 16
    args = [ctypes.c_void_p(kv.data_ptr()), ctypes.c_int(per16), ctypes.c_void_p(out.data_ptr())]
    m, bw = timeit(lambda: launch(fl, blocks, 0, args), blocks * per * ENTRY); print('ld.v4 blocks %d per %d keys: %.1f us %.2f TB/s' % (blocks, per, m, bw))
for cfg in [(128, 1024, 64, 2, 1, 'fwd'), (128, 1024, 32, 5, 1, 'fwd'), (128, 1024, 32, 5, 1, 'rev'), (128, 1024, 32, 5, 1, 'rand'), (128, 1024, 16, 11, 1, 'fwd'),
            (128, 1024, 32, 5, 8, 'fwd'), (128, 1024, 32, 5, 32, 'fwd'), (128, 1024, 64, 2, 64, 'fwd'), (128, 4096, 64, 2, 1, 'fwd'), (128, 8192, 64, 2, 1, 'fwd')]:
    m, bw = run_bulk(*cfg); print('bulk blocks %d per %d keys, stages of %d keys x %d, %d keys a copy, slots %s: %.1f us %.2f TB/s' % (cfg + (m, bw)))
