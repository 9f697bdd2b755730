"""NVRTC and the CUDA driver API through ctypes, for the microbenchmarks in benches/
(stream_read.py, launch_latency.py, mla_decode_variants.py): a CUDA source compiled for sm_90a,
its cubin loaded as a module (in the current context: create one first, e.g. with torch), its
functions by name, and a launch's median event time."""
import ctypes, os

nv = ctypes.CDLL(os.environ.get('NVRTC_LIB', '/usr/local/cuda-13.0/lib64/libnvrtc.so.13'))
_cu = None


def driver():
    """libcuda, loaded on first use"""
    global _cu
    if _cu is None:
        _cu = ctypes.CDLL('libcuda.so.1')
    return _cu


def compile_cubin(src: bytes, name: bytes) -> bytes:
    """The cubin of `src` for sm_90a; prints NVRTC's log, fails on a compile error."""
    prog = ctypes.c_void_p(); assert nv.nvrtcCreateProgram(ctypes.byref(prog), src, name, 0, None, None) == 0
    opts = [b'--gpu-architecture=sm_90a', b'-default-device', b'--std=c++17']
    rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t(); nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n)); log = ctypes.create_string_buffer(n.value); nv.nvrtcGetProgramLog(prog, log); print(log.value.decode()[:2000])
    assert rc == 0
    nv.nvrtcGetCUBINSize(prog, ctypes.byref(n)); cub = ctypes.create_string_buffer(n.value); nv.nvrtcGetCUBIN(prog, cub)
    return cub.raw


def event_median_us(go, reps, flush):
    """Median µs of `reps` runs of `go` (torch CUDA events around each) after an untimed warm-up,
    `flush` (a device tensor larger than L2) zeroed before each run."""
    import torch
    go(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); go(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


class Module:
    """A loaded cubin; `fn(name)` is a kernel's CUfunction."""

    def __init__(self, cubin: bytes):
        self.mod = ctypes.c_void_p(); assert driver().cuModuleLoadData(ctypes.byref(self.mod), cubin) == 0

    def fn(self, name: bytes):
        f = ctypes.c_void_p(); assert driver().cuModuleGetFunction(ctypes.byref(f), self.mod, name) == 0; return f
