"""One-row FP8 GEMV kernels at DeepSeek-V3's batch-1 decode shapes, timed the way a decode graph
runs them: C launches on C weight copies (together past the 50 MB L2) captured into one CUDA graph,
µs a launch = the replay's event time ÷ C (median of REPS replays). Compares linear.hip's
`gemv1_fp8w` (the engine's geometry, gemv.rs) with benches/kernels/gemv_sk.hip's stream-K forms (`skm`:
matrix units, x split a unit; `skc`: the same fed by cp.async stages; `skx`: matrix units, x split
once a launch into shared memory) and a plain streaming read of the same bytes in
the same one-wave form (the ceiling). Each output is checked
against a float64 product first.

Usage on a CUDA machine: `python3 benches/gemv_variants.py` from the repository root (assembles
hip-kernels/ sources itself; NVRTC_LIB as in nvrtc_module.py). ONLY=substring picks shapes, GEMV_ONLY=1
skips the experimental kernels, OLD_ROOT=DIR (a tree with hip-kernels/ and cuda-kernels/) adds that
tree's gemv1_fp8w as `gemv1 old`. Results: docs/BENCHMARKS.md ("twenty-fifth session"; skx: "twenty-sixth session")."""
import ctypes, os, re, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvrtc_module import Module, compile_cubin, driver  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
SHAPES = [  # (name, N, K): V3's one-row FP8 linears, and a TP8 rank's
    ('q_b (V3)', 24576, 1536), ('o_proj (V3)', 7168, 16384), ('q_a+kv_a (V3)', 2112, 7168),
    ('dense gate (V3)', 18432, 7168), ('dense down (V3)', 7168, 18432),
    ('o_proj (TP8)', 7168, 2048), ('q_b (TP8)', 3072, 1536),
]
READ = r'''
// the ceiling: each warp reads an equal contiguous share of the bytes, D 16-byte loads a lane in flight
template <int D> __device__ void rd(const uint4* p, long long n16, float* out) {
  long long tw = (long long)gridDim.x * (blockDim.x / 32), w = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  long long steps = n16 / 32, b = w * steps / tw, e = (w + 1) * steps / tw; unsigned x = 0;
  for (long long s = b; s < e; s += D) {
    uint4 v[D];
#pragma unroll
    for (int d = 0; d < D; ++d) v[d] = s + d < e ? p[(s + d) * 32 + threadIdx.x % 32] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int d = 0; d < D; ++d) x ^= v[d].x ^ v[d].w;
  }
  if (x == 0x12345678u) out[0] = x;
}
extern "C" __global__ void __launch_bounds__(256, 2) rd4(const uint4* p, long long n16, float* out) { rd<4>(p, n16, out); }
extern "C" __global__ void __launch_bounds__(256, 2) rd8(const uint4* p, long long n16, float* out) { rd<8>(p, n16, out); }
'''


def assemble(path, seen=None):
    """hip-kernels source with its includes inlined once (as engine/backend/gpu/source.rs does)"""
    seen = set() if seen is None else seen
    out = []
    for line in open(path).read().split('\n'):
        m = re.match(r'#include "(.+)"', line.strip())
        if m:
            inc = os.path.join(os.path.dirname(path), m.group(1))
            if not os.path.exists(inc):  # benches/kernels/ sources include hip-kernels/ headers
                inc = os.path.join(ROOT, 'hip-kernels', m.group(1))
            if inc not in seen:
                seen.add(inc)
                out.append(assemble(inc, seen))
        elif line.strip() != '#pragma once':
            out.append(line)
    return '\n'.join(out)


def source(name, root=ROOT):
    """hip-kernels/NAME (or benches/kernels/NAME) assembled for NVRTC"""
    pre = open(os.path.join(root, 'cuda-kernels/hip_compat.cuh')).read()
    path = os.path.join(root, 'hip-kernels', name)
    if not os.path.exists(path):
        path = os.path.join(ROOT, 'benches/kernels', name)
    return pre + '\n#define ENGINE_WARP_SIZE 32\n' + assemble(path)


def row_lanes(k, ve=16, warp=32):
    lanes = warp
    while lanes > 1 and (lanes // 2) * ve >= k:
        lanes //= 2
    return lanes


def gemv_split(n, k, ve=16, warp=32):
    split, most = 1, min(256 // warp, 8)
    while split < most and n * split < 4096 and k >= warp * ve * (split * 2):
        split *= 2
    return split


def main():
    cu = driver()
    torch.zeros(1, device='cuda')
    reps = int(os.environ.get('REPS', '20'))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lin = Module(compile_cubin(source('linear.hip').encode(), b'linear.cu'))
    # OLD_ROOT: another tree's linear.hip (its gemv1 timed as `gemv1 old`)
    old = Module(compile_cubin(source('linear.hip', os.environ['OLD_ROOT']).encode(), b'old.cu')) if os.environ.get('OLD_ROOT') else None
    sk = {cv: Module(compile_cubin((f'#define SKM_INT_CVT {cv}\n' + source('gemv_sk.hip')).encode(), b'linear_sk.cu')) for cv in (0, 1)}
    rd = Module(compile_cubin(READ.encode(), b'read.cu'))
    # the experimental forms: (key, module, kernel, rows a work group, K a step, dynamic shared bytes for K)
    skf = '' if os.environ.get('GEMV_ONLY') else open(os.path.join(ROOT, 'benches/kernels/gemv_sk.hip')).read()
    variants = [(f'sk d{d} b{b}', sk[0], f'gemv_sk_fp8w_d{d}_b{b}', 4, 512, lambda k: 0) for d, b in re.findall(r'^GEMV_SK\((\d+), (\d+)\)', skf, re.M)]
    variants += [(f'skm{"i" if cv else "f"} d{d} b{b}', sk[cv], f'gemv_skm_fp8w_d{d}_b{b}', 16, 128, lambda k: 0)
                 for d, b in re.findall(r'^GEMV_SKM\((\d+), (\d+)\)', skf, re.M) for cv in (0, 1)]
    variants += [(f'skc r{r}', sk[0], f'gemv_skc_fp8w_r{r}', 64, 128, lambda k, r=int(r): 8 * r * 8192 + 8 * 768) for r in re.findall(r'^GEMV_SKC\((\d+)\)', skf, re.M)]
    variants += [(f'skx d{d}', sk[0], f'gemv_skx_fp8w_d{d}', 16, 128, lambda k: 3 * (k + 8) * 2) for d in re.findall(r'^GEMV_SKX\((\d+)\)', skf, re.M)]
    # TB=1: only the bulk-copy-fed forms of benches/kernels/gemv_tb.hip (8 warps × NS stages of 4 rows × KC bytes)
    if os.environ.get('TB'):
        tb = Module(compile_cubin(source('gemv_tb.hip').encode(), b'gemv_tb.cu'))
        tbf = open(os.path.join(ROOT, 'benches/kernels/gemv_tb.hip')).read()
        variants = [(f'tb s{s} c{c} b{b}', tb, f'gemv_tb_fp8w_s{s}_c{c}_b{b}', 4, 512, lambda k, s=int(s), c=int(c): 8 * s * 4 * c)
                    for s, c, b in re.findall(r'^GEMV_TB\((\d+), (\d+), (\d+)\)', tbf, re.M)]
    gen = torch.Generator(device='cuda').manual_seed(int.from_bytes(os.urandom(4), 'little'))

    def occupancy(f, smem=0):
        b = ctypes.c_int(); assert cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(b), f, 256, ctypes.c_size_t(smem)) == 0
        r = ctypes.c_int(); cu.cuFuncGetAttribute(ctypes.byref(r), 4, f)
        return b.value, r.value

    def launcher(f, grid, args, smem=0):
        keep = [a for a in args]
        arr = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in keep])

        def go(keep=keep, arr=arr):
            r = cu.cuLaunchKernel(f, grid, 1, 1, 256, 1, 1, smem, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), arr, None)
            assert r == 0, r
        return go

    def graph_us(gos):
        """µs a launch of the launches `gos`, captured in one graph and replayed"""
        for g in gos:
            g()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for g in gos:
                g()
        graph.replay(); torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); graph.replay(); b.record(); torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / len(gos))
        ts.sort()
        return ts[len(ts) // 2]

    table = []
    for name, n, k in [s for s in SHAPES if os.environ.get('ONLY', '') in s[0]]:
        nbytes = n * k
        copies = max(4, -(-320_000_000 // nbytes))
        ws = [(torch.randn(n, k, device='cuda', generator=gen) * 0.5).to(torch.float8_e4m3fn).view(torch.uint8) for _ in range(copies)]
        ss = [torch.rand((n + 127) // 128, (k + 127) // 128, device='cuda', generator=gen) + 0.5 for _ in range(copies)]
        x = torch.randn(k, device='cuda', generator=gen)
        ref = ((ws[0].view(torch.float8_e4m3fn).double() * ss[0].double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]) @ x.double())
        ys = [torch.full((n,), float('nan'), device='cuda') for _ in range(copies)]
        row = {'shape': name, 'MB': nbytes / 1e6}
        P = ctypes.c_void_p

        def check(label):
            torch.cuda.synchronize()
            err = ((ys[0].double() - ref).norm() / ref.norm()).item()
            assert err < 1e-5, f'{name} {label}: relative error {err}'
            return err
        # linear.hip's gemv1_fp8w with the engine's geometry
        groups = -(-n // 4)
        lanes = row_lanes(k)
        split = gemv_split(groups, k) if lanes == 32 else 1
        blocks = -(-groups // (8 // split * (32 // lanes)))

        def gemv1_launches(f):
            return [launcher(f, blocks, [P(x.data_ptr()), P(ws[i].data_ptr()), P(ss[i].data_ptr()), P(ys[i].data_ptr()), ctypes.c_int(1), ctypes.c_int(n),
                                         ctypes.c_int(k), ctypes.c_int(128), ctypes.c_int(128), ctypes.c_int(split), ctypes.c_int(lanes)]) for i in range(copies)]
        f = lin.fn(b'gemv1_fp8w')
        gos = gemv1_launches(f)
        gos[0](); print(f'  gemv1: relative error {check("gemv1"):.2e}')
        bps, regs = occupancy(f)
        row['gemv1'] = graph_us(gos)
        if old:
            row['gemv1 old'] = graph_us(gemv1_launches(old.fn(b'gemv1_fp8w')))
            row['gemv1'] = graph_us(gos)
        print(f'{name}: {nbytes / 1e6:.1f} MB, {copies} copies; gemv1 split {split} lanes {lanes} {blocks} blocks ({bps} an SM, {regs} regs): {row["gemv1"]:.2f} us', flush=True)
        # the stream-K forms: one wave, parts of cut groups and their counts (zero between launches)
        for key, mod, fname, rows, kstep, smem_of in variants:
            f = mod.fn(fname.encode())
            smem = smem_of(k)
            if smem:
                assert cu.cuFuncSetAttribute(f, 8, smem) == 0  # MAX_DYNAMIC_SHARED_SIZE_BYTES
            bps, regs = occupancy(f, smem)
            steps, ngroups = -(-k // kstep), -(-n // rows)
            grid = min(sms * bps, max(1, ngroups * steps // 8))
            part = torch.empty(2 * grid * 8 * rows, device='cuda')
            cnt = torch.zeros(ngroups, dtype=torch.int32, device='cuda')
            for y in ys:
                y.fill_(float('nan'))
            gos = [launcher(f, grid, [P(x.data_ptr()), P(ws[i].data_ptr()), P(ss[i].data_ptr()), P(ys[i].data_ptr()), ctypes.c_int(n), ctypes.c_int(k),
                                      ctypes.c_int(128), ctypes.c_int(128), P(part.data_ptr()), P(cnt.data_ptr())], smem) for i in range(copies)]
            gos[0](); e1 = check(key)
            gos[0](); e2 = check(key + ' (again)')
            assert int(cnt.abs().sum()) == 0, 'counts left set'
            row[key] = graph_us(gos)
            print(f'  {key}: {grid} blocks ({bps} an SM, {regs} regs, {smem} B shared): {row[key]:.2f} us, relative error {e1:.2e} / {e2:.2e}', flush=True)
        for rn in (b'rd8',):
            f = rd.fn(rn)
            bps, _ = occupancy(f)
            gos = [launcher(f, sms * bps, [P(ws[i].data_ptr()), ctypes.c_longlong(nbytes // 16), P(ys[i].data_ptr())]) for i in range(copies)]
            row[rn.decode()] = graph_us(gos)
            print(f'  read {rn.decode()}: {row[rn.decode()]:.2f} us', flush=True)
        table.append(row)
        ws = ss = ys = None  # this shape's copies freed before the next one's
        torch.cuda.empty_cache()
    keys = [k for k in table[0] if k not in ('shape', 'MB')]
    print('\nshape | MB | ' + ' | '.join(keys) + '   (us a launch; TB/s in brackets)')
    for r in table:
        print(f"{r['shape']} | {r['MB']:.1f} | " + ' | '.join(f"{r[k]:.2f} ({r['MB'] / r[k]:.2f})" for k in keys))


if __name__ == '__main__':
    main()
