"""The 16-head MLA decode kernel (hip-kernels/mla_decode_rows.hip) in tile variants on synthetic
data: each variant's defines (MR_KG, MR_VS, MR_ST and the MR_* switches) set in the assembled
source, compiled with NVRTC for sm_90a, checked against a float64 attention on the same bf16
values, then timed over batch × context cases (event medians with L2 flushed before each launch;
under ncu the kernel times). Splits are chosen as the engine does
(mla_decode.rs rows_splits) from the blocks an SM holds (the occupancy API).

    engine kernels source --model-path TP8_CHECKPOINT --arch sm_90a --out SRC
    python3 benches/mla_decode_variants.py SRC/mla_decode_rows.hip [variant ...]

Environment: REPS (timed launches a case, default 30), CASES (e.g. 32x4096,128x64), NVRTC_LIB (benches/nvrtc_module.py).
Results: docs/BENCHMARKS.md ("twenty-third session")."""
import ctypes, math, os, re, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvrtc_module import Module, compile_cubin, driver, event_median_us  # noqa: E402

VARIANTS = {
    'base': {},
    'kg2': {'MR_KG': 2},  # 32-key tiles, 4 warps, two blocks an SM (twice the splits)
    'spread': {'MR_SPREAD': 1},  # a tile's copies from 8 lanes of each warp
    'kg2s': {'MR_KG': 2, 'MR_SPREAD': 1},
    'kg3st3': {'MR_KG': 3, 'MR_ST': 3},  # 48-key tiles three deep (two in flight while one is worked on), 6 warps
    'kg3st3s': {'MR_KG': 3, 'MR_ST': 3, 'MR_SPREAD': 1},
    'whole': {'MR_QKS': 0},  # each warp computes its key group's whole scores (the other variants split them, the file's default)
    'sa2': {'MR_SA': 2},  # two partial score sums
    'vs4': {'MR_VS': 4, 'MR_KG': 2, 'MR_ST': 4},  # 32-key tiles four deep, a key group's scores split over 4 warps
    'vs4s3': {'MR_VS': 4, 'MR_KG': 2, 'MR_ST': 3},
    'w32': {'MR_VS': 4, 'MR_KG': 2, 'MR_KW': 32},  # 64-key tiles over 2 key groups of 32 keys × 4 value quarters
    'w32sa2': {'MR_VS': 4, 'MR_KG': 2, 'MR_KW': 32, 'MR_SA': 2},
    'w32vs2': {'MR_VS': 2, 'MR_KG': 2, 'MR_KW': 32, 'MR_SA': 2},  # 4 warps
}
CASES = [(32, 4096), (16, 8192), (8, 32768), (4, 32768), (1, 32768), (128, 64), (128, 1024), (128, 0)]
if os.environ.get('CASES'):  # e.g. CASES=32x4096,128x64
    CASES = [tuple(int(x) for x in c.split('x')) for c in os.environ['CASES'].split(',')]
HEADS, LORA, ROPE, NOPE, ENTRY, QK = 16, 512, 64, 128, 576, 192
MAX_SPLITS, MIN_CHUNK, SMS = 128, 64, torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132


def variant_source(src: str, over: dict) -> str:
    for k, v in over.items():
        src, n = re.subn(rf'^#define {k} .*$', f'#define {k} {v}', src, count=1, flags=re.M)
        assert n == 1, k
    return src


def define(src: str, name: str) -> int:
    return int(re.search(rf'^#define {name} (\d+)', src, flags=re.M).group(1))


def layout(src: str, over: dict):
    """(threads, keys a tile, sizeof(MrShared)) of a variant, as the kernel's defines give them"""
    kg, vs, st, kw = (over.get(k, define(src, k)) for k in ('MR_KG', 'MR_VS', 'MR_ST', 'MR_KW'))
    kt, d = kg * kw, (ENTRY + 15) // 16 * 16
    vw = (LORA + 16 * vs - 1) // (16 * vs) * (16 * vs)
    dp = max(d, vw) + 8
    size = HEADS * dp * 2 + st * kt * dp * 2 + kg * HEADS * 2 * 4 + HEADS * 4
    size += kg * vs * kw // 2 * 32 * 4 if over.get('MR_QKS', define(src, 'MR_QKS')) and vs > 1 and d // 16 % vs == 0 else 0  # split scores
    size = (size + 7) // 8 * 8 + st * 8
    return 32 * kg * vs, kt, size


def rows_splits(blocks, slots, max_len, kt):
    cap = max(1, min(MAX_SPLITS, -(-max_len // MIN_CHUNK)))
    return min(range(1, cap + 1), key=lambda s: (-(-(blocks * s) // slots)) * (-(-max_len // s) + kt))


def main():
    src = open(sys.argv[1]).read()
    names = sys.argv[2:] or list(VARIANTS)
    cu = driver()
    torch.zeros(1, device='cuda')
    reps = int(os.environ.get('REPS', '30'))
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    nslots = max(t * l for t, l in CASES) + 4096
    gen = torch.Generator(device='cuda').manual_seed(int.from_bytes(os.urandom(4), 'little'))
    kv = (torch.randn(nslots, ENTRY, device='cuda', generator=gen) * 0.5).bfloat16()
    flush = torch.empty(200 << 20, dtype=torch.uint8, device='cuda')
    rows = []
    for name in names:
        over = VARIANTS[name]
        threads, kt, smem = layout(src, over)
        f = Module(compile_cubin(('typedef unsigned long long uint64_t;\n' if 'uint64_t' not in src[:200] else '').encode() + variant_source(src, over).encode(), name.encode() + b'.cu')).fn(b'mla_decode_rows')
        assert cu.cuFuncSetAttribute(f, 8, smem) == 0  # MAX_DYNAMIC_SHARED_SIZE_BYTES
        bps = ctypes.c_int()
        assert cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(bps), f, threads, ctypes.c_size_t(smem)) == 0
        regs = ctypes.c_int(); cu.cuFuncGetAttribute(ctypes.byref(regs), 4, f)  # NUM_REGS
        print(f'variant {name} {over}: {threads} threads, {kt}-key tiles, {smem} B shared, {bps.value} blocks an SM, {regs.value} registers', flush=True)

        def launch(t, lens, splits, slot_lists, out, part):
            flat = torch.cat(slot_lists).int()
            off = torch.tensor([0] + [len(s) for s in slot_lists][:-1], device='cuda').cumsum(0).int()
            ln = torch.tensor(lens, device='cuda').int()
            q = torch.randn(t, HEADS, QK, device='cuda', generator=gen)
            ql = torch.randn(t, HEADS, LORA, device='cuda', generator=gen)
            keep = [q, ql, flat, off, ln]
            args = [ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(ql.data_ptr()), ctypes.c_void_p(kv.data_ptr()), ctypes.c_void_p(flat.data_ptr()),
                    ctypes.c_void_p(off.data_ptr()), ctypes.c_void_p(ln.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int(HEADS), ctypes.c_int(0),
                    ctypes.c_int(nslots), ctypes.c_float(1 / math.sqrt(QK)), ctypes.c_int(splits), ctypes.c_int(MIN_CHUNK), ctypes.c_void_p(part.data_ptr()), ctypes.c_int(smem)]
            arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])

            def go(args=args, arr=arr):
                r = cu.cuLaunchKernel(f, t, 1, splits, threads, 1, 1, smem, stream, arr, None)
                assert r == 0, r
            return go, keep

        # numerics: uneven contexts, splits with empty ones, and one split; descending slots as the pool hands them out
        for lens, splits in [([1000, 37, 300], 20), ([200, 65], 1)]:
            t = len(lens)
            starts = torch.randint(0, nslots - 1100, (t,)).tolist()
            sl = [torch.arange(s + n - 1, s - 1, -1, device='cuda') for s, n in zip(starts, lens)]
            out = torch.zeros(t, HEADS, LORA, device='cuda')
            part = torch.full((t, HEADS, splits, 2 + LORA), float('nan'), device='cuda')
            go, (q, ql, *_) = launch(t, lens, splits, sl, out, part)
            go(); torch.cuda.synchronize()
            if splits > 1:
                m, l, v = part[..., 0], part[..., 1], part[..., 2:]
                mm = m.max(-1, keepdim=True).values
                w = torch.where(l > 0, torch.exp(m - mm), torch.zeros_like(m))
                out = (w.unsqueeze(-1) * torch.nan_to_num(v)).sum(2) / (w * l).sum(-1, keepdim=True)
            err = 0.0
            for i in range(t):
                qq = torch.cat([ql[i], q[i, :, NOPE:]], -1).bfloat16().double()
                kk = kv[sl[i].long()].double()
                p = torch.softmax(qq @ kk.T / math.sqrt(QK), -1)
                ref = p @ kk[:, :LORA]
                err = max(err, ((out[i].double() - ref).norm() / ref.norm()).item())
            print(f'  numerics lens {lens} splits {splits}: relative error {err:.2e}', flush=True)
            assert err < 1e-2, f'{name}: relative error {err}'
        for t, ln in CASES:
            splits = 1 if ln <= 1024 and t >= 128 else rows_splits(t, SMS * bps.value, ln, kt)  # 128 x 0: the launch alone
            starts = [i * ln for i in range(t)]
            sl = [torch.arange(s + ln - 1, s - 1, -1, device='cuda') for s in starts]
            out = torch.zeros(t, HEADS, LORA, device='cuda')
            part = torch.empty(t * HEADS * splits * (2 + LORA) if splits > 1 else 1, device='cuda')
            go, keep = launch(t, [ln] * t, splits, sl, out, part)
            med = event_median_us(go, reps, flush)
            mb = t * ln * ENTRY * 2 / 1e6
            rows.append((name, t, ln, splits, med, mb))
            print(f'  {t} x {ln}: splits {splits}, {med:.1f} us (event), {mb:.1f} MB, {mb / med:.2f} TB/s', flush=True)
    print('\nvariant | ' + ' | '.join(f'{t}x{ln}' for t, ln in CASES))
    for name in names:
        print(name + ' | ' + ' | '.join(f'{r[4]:.1f}' for r in rows if r[0] == name))


if __name__ == '__main__':
    main()
