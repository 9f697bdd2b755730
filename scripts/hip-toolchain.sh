#!/usr/bin/env bash
# HIP device toolchain for Debian 12 (bookworm) x86_64 with no GPU, for the kernel compile checks
# (after ../shared/reference/rocm-toolchain, the tested recipe this project follows).
#  - gfx942 (MI300X): bookworm clang-19 + trixie HIP 5.7 headers + trixie rocm-device-libs-17 (6.0)
#  - gfx950 (MI355X): clang 22 shipped inside PyPI "ziglang" (zig clang) + same headers/device-libs (+ generated oclc_isa_version_950.bc)
#  - runtime probe:   trixie libamdhip64 5.7 / librccl 5.4.3 / comgr 6.0 run via a PRIVATE trixie glibc loader (never installed system-wide)
# Idempotent. Usage: bash scripts/hip-toolchain.sh [PREFIX]   (default /opt/rocm-trixie).
set -euo pipefail
PREFIX=${1:-/opt/rocm-trixie}

APTDIR=${TRIXIE_APT_DIR:-/tmp/trixie}
ZIG_VER=${ZIG_VER:-0.17.1}
export DEBIAN_FRONTEND=noninteractive
log(){ printf '\n=== %s\n' "$*"; }

log "1. bookworm packages (native install)"
need=""; for p in clang-19 lld-19 llvm-19 clang-tools-19 libclang-19-dev python3-venv; do dpkg -s $p >/dev/null 2>&1 || need="$need $p"; done
[ -z "$need" ] || { apt-get update -qq; apt-get install -y --no-install-recommends $need; }

log "2. private trixie apt config in $APTDIR (never used for install)"
mkdir -p $APTDIR/lists/partial $APTDIR/cache/archives/partial
[ -f $APTDIR/sources.list ] || echo "deb http://deb.debian.org/debian trixie main" > $APTDIR/sources.list
o="-oDir::Etc::SourceList=$APTDIR/sources.list -oDir::Etc::SourceParts=/dev/null -oDir::State::Lists=$APTDIR/lists -oDir::Cache=$APTDIR/cache"
ls $APTDIR/lists/*trixie*Packages* >/dev/null 2>&1 || apt-get $o update

log "3. download + dpkg -x trixie ROCm packages into $PREFIX"
ROCM_PKGS="libamdhip64-dev libamdhip64-5 libhiprtc-builtins5 rocm-device-libs-17 librccl-dev librccl1 libamd-comgr2 libamd-comgr-dev libhsa-runtime64-1 libhsa-runtime-dev libhsakmt1 librocm-smi64-1 hipcc libllvm17t64"
GLIBC_PKGS="libc6 libstdc++6 libgcc-s1 libnuma1 libzstd1 zlib1g libelf1t64 libdrm2 libdrm-amdgpu1 libffi8 libedit2 libxml2 libtinfo6 libbsd0 libmd0 liblzma5 libicu76 libz3-4"
DEBS=$PREFIX/debs; mkdir -p $DEBS/rocm $DEBS/glibc
if [ ! -f $PREFIX/.stamp-debs ]; then
  (cd $DEBS/rocm && apt-get $o download $ROCM_PKGS)
  (cd $DEBS/glibc && apt-get $o download $GLIBC_PKGS)
  for d in $DEBS/rocm/*.deb; do dpkg -x "$d" $PREFIX; done
  for d in $DEBS/glibc/*.deb; do dpkg -x "$d" $PREFIX/glibc; done   # separate: only used via explicit ld.so
  touch $PREFIX/.stamp-debs
fi
DL=$PREFIX/usr/lib/llvm-17/lib/clang/17/amdgcn/bitcode
TLIB=$PREFIX/usr/lib/x86_64-linux-gnu; GLIB=$PREFIX/glibc/usr/lib/x86_64-linux-gnu

log "4. device-libs overlay with gfx950 ISA-version bitcode"
DLO=$PREFIX/devlibs; mkdir -p $DLO
for f in $DL/*.bc; do ln -sfn "$f" $DLO/; done
[ -f $DLO/oclc_isa_version_950.bc ] || llvm-dis-19 -o - $DL/oclc_isa_version_942.bc | sed 's/i32 9402/i32 9500/' | llvm-as-19 -o $DLO/oclc_isa_version_950.bc

log "5. clang 22 via PyPI ziglang==$ZIG_VER (for gfx950)"
[ -x $PREFIX/zig-venv/bin/python ] || python3 -m venv $PREFIX/zig-venv
$PREFIX/zig-venv/bin/python -c "import ziglang" 2>/dev/null || $PREFIX/zig-venv/bin/pip install -q "ziglang==$ZIG_VER"
ZIGPKG=$($PREFIX/zig-venv/bin/python -c 'import ziglang,os;print(os.path.dirname(ziglang.__file__))')
ZIG=$ZIGPKG/zig; mkdir -p $PREFIX/zigbin
printf '#!/bin/sh\nexec %s clang "$@"\n' $ZIG > $PREFIX/zigbin/clang
printf '#!/bin/sh\n# clang AMDGPU toolchain runs "lld -flavor gnu ..."\nif [ "$1" = "-flavor" ]; then shift 2; fi\nexec %s ld.lld "$@"\n' $ZIG > $PREFIX/zigbin/lld
cp $PREFIX/zigbin/lld $PREFIX/zigbin/ld.lld; chmod +x $PREFIX/zigbin/*
ln -sfn /usr/lib/llvm-19/bin/clang-offload-bundler $PREFIX/zigbin/clang-offload-bundler
# composite resource dir: zig's clang builtin headers + clang-19's CUDA/HIP wrapper headers (zig strips those)
RD=$PREFIX/zig-resdir; rm -rf $RD; mkdir -p $RD/include
for f in $ZIGPKG/lib/include/*; do ln -s "$f" $RD/include/; done
for f in /usr/lib/llvm-19/lib/clang/19/include/cuda_wrappers /usr/lib/llvm-19/lib/clang/19/include/__clang_cuda_* /usr/lib/llvm-19/lib/clang/19/include/__clang_hip_*; do
  [ -e $RD/include/$(basename $f) ] || ln -s "$f" $RD/include/; done

log "6. compiler wrappers in $PREFIX/bin"
mkdir -p $PREFIX/bin
cat > $PREFIX/bin/hipdev-clang19 <<EOF
#!/bin/sh
# device-only HIP compile with Debian clang-19 (gfx90a/gfx942/gfx11xx...; NOT gfx950)
exec /usr/bin/clang++-19 -x hip -nogpuinc -I$PREFIX/usr/include -D__HIP_PLATFORM_AMD__ --rocm-device-lib-path=$DLO \\
  -Wno-ignored-attributes --offload-device-only "\$@"
EOF
cat > $PREFIX/bin/hipdev-clang22 <<EOF
#!/bin/sh
# device-only HIP compile with clang 22 from ziglang (gfx942 AND gfx950). wave64 only (gfx9).
# clang>=21 dropped __AMDGCN_WAVEFRONT_SIZE (HIP 5.7 headers need it) and no longer links oclc_daz_opt (6.0 ocml needs it);
# default code object v6 needs ROCm>=6.3 device libs -> force v5.
PATH=$PREFIX/zigbin:/usr/lib/llvm-19/bin:\$PATH exec $PREFIX/zigbin/clang --target=x86_64-linux-gnu -resource-dir=$RD \\
  -x hip -nogpuinc -I$PREFIX/usr/include -D__HIP_PLATFORM_AMD__ --rocm-device-lib-path=$DLO -mcode-object-version=5 \\
  -D__AMDGCN_WAVEFRONT_SIZE=64 -Xclang -mlink-builtin-bitcode -Xclang $DLO/oclc_daz_opt_off.bc \\
  -Wno-ignored-attributes --offload-device-only "\$@"
EOF
cat > $PREFIX/bin/trixie-run <<EOF
#!/bin/sh
# run a (bookworm-built) program with trixie glibc so it can dlopen trixie libamdhip64/librccl/comgr
exec $GLIB/ld-linux-x86-64.so.2 --library-path $TLIB:$GLIB "\$@"
EOF
chmod +x $PREFIX/bin/*

