#!/usr/bin/env bash
# README command 1 as a newcomer meets it: a fresh clone, the install, the model's one-time
# conversion and `fedsilo demo`, timed together. Writes benchmarks/results/demo.json here, or
# the results file named (on a CPU without native bf16: demo-no-native-bf16.json).
#     bash benchmarks/demo_clean_clone.sh [RESULTS_FILE_NAME]
set -euo pipefail
source_repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
git clone -q "$source_repo" "$work/fedsilo"
cd "$work/fedsilo"
export FEDSILO_CACHE="$work/cache"  # an empty cache: the conversion is part of the wait
export TORCHINDUCTOR_CACHE_DIR="$work/inductor"  # and so is compiling the training loop
started=$(date +%s.%N)
bash scripts/setup.sh
installed=$(date +%s.%N)
install_seconds=$(python3 -c "print($installed - $started)")
.venv/bin/python benchmarks/demo_quality.py --out-run "$work/run" \
    --out "$source_repo/benchmarks/results/${1:-demo.json}" --install-seconds "$install_seconds"
echo "clean clone in $work"
