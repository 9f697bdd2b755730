#!/usr/bin/env bash
# Compiles every HIP kernel module, exactly as the engine's JIT assembles it, for gfx942 (MI300X,
# Debian clang-19) and gfx950 (MI355X, clang 22 from PyPI ziglang), and reports each kernel's
# SGPRs, VGPRs, AGPRs, LDS, scratch and occupancy. A kernel with scratch (spills) fails the check,
# and so does a matrix-unit module (linear_mma, moe_grouped, moe_tc, linear_tc, the MLA flash
# prefill and matrix-unit decode) without v_mfma.
# Needs scripts/hip-toolchain.sh. Usage: bash scripts/hip-compile-check.sh ENGINE_BIN [PREFIX]
set -euo pipefail
ENGINE=${1:?engine binary}
PREFIX=${2:-/opt/rocm-trixie}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0
printf '%-8s %-26s %-22s %6s %6s %6s %8s %8s %5s\n' arch module kernel SGPRs VGPRs AGPRs LDS scratch occ
for model in tests/golden/data/tiny_v3 tests/golden/data/tiny_v3_fp8 configs/models/deepseek-v3; do
  for arch in gfx942 gfx950; do
    src="$work/$arch/$(basename $model)"
    "$ENGINE" kernels source --model-path "$here/$model" --arch $arch --out "$src" >/dev/null
    cc=$PREFIX/bin/hipdev-clang19; [ $arch = gfx950 ] && cc=$PREFIX/bin/hipdev-clang22
    # every module as the engine builds it (mla_prefill_bf16: the flash prefill's FB_PARTS=1 form
    # for --fp8-activations dynamic)
    for f in "$src"/*.hip; do
      m=$(basename "$f" .hip)
      if ! $cc -O3 --offload-arch=$arch --no-gpu-bundle-output -Rpass-analysis=kernel-resource-usage \
           -c "$f" -o "$work/$arch-$m.hsaco" 2> "$work/$arch-$m.log"; then
        echo "FAIL: $arch $model $m does not compile:"; grep -E 'error' "$work/$arch-$m.log" | head -20; fail=1; continue
      fi
      # remarks come in blocks per kernel: Function Name, SGPRs, VGPRs, AGPRs, ScratchSize, Occupancy, ... LDS Size
      python3 - "$work/$arch-$m.log" $arch "$(basename $model)/$m" <<'PY' || fail=1
import re, sys
log, arch, mod = sys.argv[1], sys.argv[2], sys.argv[3]
cur, rows = None, []
for line in open(log):
    m = re.search(r"remark: (.*?)(?: \[-Rpass-analysis.*)?$", line.strip())
    if not m: continue
    kv = m.group(1)
    if kv.startswith("Function Name:"):
        cur = {"name": kv.split(":", 1)[1].strip()}; rows.append(cur); continue
    if cur is not None and ":" in kv:
        k, v = kv.split(":", 1); cur[k.strip()] = v.strip()
bad = False
for r in rows:
    scratch = int(r.get("ScratchSize [bytes/lane]", r.get("ScratchSize", "0")).split()[0])
    spills = int(r.get("SGPRs Spill", "0")) + int(r.get("VGPRs Spill", "0"))
    sgprs = r.get("SGPRs", r.get("TotalSGPRs", "?"))
    print(f"{arch:<8} {mod:<26} {r['name'][:22]:<22} {sgprs:>6} {r.get('VGPRs','?'):>6} {r.get('AGPRs','?'):>6} "
          f"{r.get('LDS Size [bytes/block]','?'):>8} {scratch:>8} {r.get('Occupancy [waves/SIMD]','?'):>5}")
    if scratch > 0 or spills > 0:
        print(f"FAIL: {arch} {mod} {r['name']} spills ({scratch} bytes of scratch per lane, {spills} registers spilled)"); bad = True
if not rows:
    print(f"FAIL: {arch} {mod}: no kernel resource report"); bad = True
sys.exit(1 if bad else 0)
PY
      # the matrix-unit modules must really use MFMA on CDNA (not a silent fallback path); decoded
      # as gfx942 (LLVM 19's disassembler has no gfx950; the MFMA encodings used are gfx942's)
      case $m in linear_mma|moe_grouped|moe_tc|linear_tc|mla_prefill|mla_prefill_bf16|mla_decode)
        n=$(llvm-objdump-19 -d --mcpu=gfx942 "$work/$arch-$m.hsaco" 2>/dev/null | grep -c v_mfma || true)
        if [ "${n:-0}" -eq 0 ]; then
          echo "FAIL: $arch $model $m has no v_mfma instruction"; fail=1
        fi;;
      esac
    done
  done
done
exit $fail
