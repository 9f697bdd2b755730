#!/usr/bin/env bash
# The engine's own hipRTC path, without a GPU: `engine kernels warmup --arch gfx942` through
# Debian's HIP 5.7 runtime (run under the private trixie loader of scripts/hip-toolchain.sh, since
# that runtime needs a newer glibc than Debian 12's), then a second run that must compile nothing.
# (gfx950 is not checked here: HIP 5.7's hipRTC predates it and aborts; ROCm >= 6.4 images handle it.)
set -euo pipefail
ENGINE=${1:?engine binary}
PREFIX=${2:-/opt/rocm-trixie}
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
export ENGINE_HIP_LIB=$PREFIX/usr/lib/x86_64-linux-gnu/libamdhip64.so.5 ENGINE_KERNEL_CACHE_DIR=$cache
run() { timeout 600 "$PREFIX/bin/trixie-run" "$ENGINE" kernels warmup --arch gfx942 --model-path "$1" 2>&1 | tail -1; }
first=$(run configs/models/deepseek-v3)
echo "hipRTC gfx942, DeepSeek-V3 shapes: $first"
case "$first" in *"compiled, 0 already cached"*) ;; *) echo "FAIL: first warmup did not compile"; exit 1;; esac
second=$(run configs/models/deepseek-v3)
echo "second start: $second"
case "$second" in *" 0 compiled,"*) ;; *) echo "FAIL: a warm cache still compiled"; exit 1;; esac
"$ENGINE" kernels list
