#!/usr/bin/env bash
# GPU call 1 of 2 (carry: .gpu/wheels.tar.xz .gpu/gguf-a): install the dependency wheels under
# /tmp/site, keep the first part of the model in /tmp, print the machine, and check on a tiny
# model that training, DP-SGD, gold scoring and a small simulated federation run on CUDA.
# Exits nonzero, naming the failed step, if anything does not. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:?OUT must name the folder whose files come back}
LOG=$OUT/call1.log
exec > >(tee -a "$LOG") 2>&1
fail() { echo "CALL1 FAILED: $*"; exit 1; }
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }
SECONDS=0
# A dry run elsewhere: DEVICE=cpu PY=.venv/bin/python SKIP_INSTALL=1 (wheels are for 3.12).
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
TIMING_STEPS=${TIMING_STEPS:-10}
TIMING_PROCESSES=${TIMING_PROCESSES:-6}
TIMING_GOLD=${TIMING_GOLD:-200}
TIMING_SHAPE=${TIMING_SHAPE:-smollm2}  # tiny: a quick dry run

step "unpack and install wheels"
[[ -f .gpu/wheels.tar.xz && -f .gpu/gguf-a ]] || fail "carry .gpu/wheels.tar.xz and .gpu/gguf-a"
rm -rf /tmp/gpu-wheels && mkdir -p /tmp/gpu-wheels /tmp/gpu
if [[ -z ${SKIP_INSTALL:-} ]]; then
python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
  .gpu/wheels.tar.xz /tmp/gpu-wheels || fail "cannot unpack .gpu/wheels.tar.xz"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site /tmp/gpu-wheels/stored/*.whl || fail "pip install of the wheels"
fi
cp .gpu/gguf-a /tmp/gpu/gguf-a || fail "cannot keep gguf-a in /tmp/gpu"
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "installed $(ls /tmp/gpu-wheels/stored 2>/dev/null | wc -l) wheels in ${SECONDS}s"

step "machine"
nvidia-smi || echo "(no nvidia-smi)"
"$PY" - <<'PY' || fail "an import failed (see above)"
import importlib, importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
for name in ("transformers", "peft", "tokenizers", "huggingface_hub", "safetensors", "flwr",
             "opacus", "dp-accounting", "pydantic", "cryptography", "numpy", "scipy", "grpcio",
             "protobuf", "gguf", "simple_icd_10_cm", "tenseal", "rich", "typer", "pyarrow"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} (not installed)")
for module in ("fedsilo.cli.main", "fedsilo.bench.quality", "fedsilo.bench.sweep",
               "fedsilo.simulation.engines", "fedsilo.server.app", "fedsilo.client.app",
               "fedsilo.model.base", "gguf"):
    importlib.import_module(module)
print("imports ok")
PY

step "smoke: tiny model, train.device = $DEVICE"
timeout 240 "$PY" benchmarks/gpu/smoke.py --device "$DEVICE" --out /tmp/gpu/smoke \
  || fail "smoke (training, DP-SGD or gold scoring on CUDA)"
cp /tmp/gpu/smoke/smoke-tiny.json "$OUT/smoke-gpu.json"

if [[ -z ${SKIP_TINY_BENCH:-} ]]; then
step "smoke: tiny quality benchmark (sweep, all algorithms, in-process federation) on $DEVICE"
rm -rf /tmp/gpu/tiny-bench
timeout 300 "$PY" -m fedsilo.cli.main bench quality --task icd10-by-specialty \
  --model /tmp/gpu/smoke/tiny-llama --device "$DEVICE" --sites 8 --examples-per-site 24 \
  --train-on-inclusion-terms --validation-share 0.1 --gold-size 8 --gold-phrasings 8 \
  --gold-ranking-candidates 10 --rounds 2 --local-steps 2 --batch-size 16 --lora-rank 4 \
  --lr-schedule cosine --warmup-rounds 1 --seeds 0 --sweep --lr-grid 0.002 --mu 0.01 \
  --sweep-algorithms fedavg,fedprox --out /tmp/gpu/tiny-bench/runs \
  --results /tmp/gpu/tiny-bench/quality-gpu-tiny.json \
  --summary /tmp/gpu/tiny-bench/quality-gpu-tiny-summary.json \
  || fail "tiny quality benchmark on CUDA"
"$PY" - "$DEVICE" /tmp/gpu/tiny-bench/quality-gpu-tiny.json <<'PY' || fail "tiny benchmark results"
import json, math, sys
device, path = sys.argv[1:]
data = json.load(open(path))
assert data["complete"], "results not complete"
assert data["machine"]["device"].startswith(device), data["machine"]
assert data["train"].get("device") is None  # identity holds no device
print("device", data["machine"]["device"], "algorithms", sorted(data["algorithms"]))
run = json.load(open(data["algorithms"]["fedavg"]["run_dir"] + "/run.json"))
print("run.json precision_choice", run["precision_choice"])
assert run["precision_choice"]["device"] == device
for name, result in data["algorithms"].items():
    rows = result.get("per_round") or []
    for row in rows:
        assert math.isfinite(row["gold_loss"]), (name, row)
        assert math.isfinite(row.get("train_loss", 0.0)), (name, row)
print("tiny benchmark ok in", round(data["wall_seconds"]), "s")
PY
cp /tmp/gpu/tiny-bench/quality-gpu-tiny.json "$OUT/quality-gpu-tiny.json"
fi

# Step times of SmolLM2-135M's decoder shape (random weights): what sizes call 2's budget.
step "timing: SmolLM2-shaped model, one process, then $TIMING_PROCESSES at once"
timeout 180 "$PY" benchmarks/gpu/smoke.py --device "$DEVICE" --shape "$TIMING_SHAPE" \
  --steps "$TIMING_STEPS" --gold-size "$TIMING_GOLD" --out /tmp/gpu/shape || echo "(timing failed; not fatal)"
pids=()
for i in $(seq "$TIMING_PROCESSES"); do
  timeout 240 "$PY" benchmarks/gpu/smoke.py --device "$DEVICE" --shape "$TIMING_SHAPE" \
    --steps "$TIMING_STEPS" --gold-size "$TIMING_GOLD" --out /tmp/gpu/shape --tag="-parallel$i" \
    >"/tmp/gpu/shape/parallel$i.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
grep -h "ms per step\|gold:" /tmp/gpu/shape/parallel*.log
"$PY" - "$OUT/timing-gpu.json" /tmp/gpu/shape/smoke-*.json <<'PY' || true
import json, sys
reports = {path.rsplit("/", 1)[-1]: json.load(open(path)) for path in sys.argv[2:]}
json.dump(reports, open(sys.argv[1], "w"), indent=2)
alone = next((r for name, r in reports.items() if "parallel" not in name), {})
together = [r for name, r in reports.items() if "parallel" in name]
if alone and together:
    for kind in ("plain", "dp-sgd"):
        one = alone[f"{kind}_seconds_per_step"]
        many = sum(r[f"{kind}_seconds_per_step"] for r in together) / len(together)
        print(f"{kind}: {one * 1000:.0f} ms per step alone, {many * 1000:.0f} ms each with "
              f"{len(together)} processes: {len(together) * one / many:.1f}x the throughput")
    print(f"gold (headline, phrasings, ranking x 10): {alone['gold_seconds']:.1f} s alone")
PY
echo; echo "CALL1 OK in ${SECONDS}s; /tmp/site and /tmp/gpu/gguf-a stay while the machine is warm"
