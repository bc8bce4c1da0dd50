"""The demo's gold-set quality before and after federated training, with its timings.

    python benchmarks/demo_quality.py [--out-run runs/bench-demo] [--install-seconds S]

Runs `fedsilo demo` (the embedded default config) and writes benchmarks/results/demo.json.
`benchmarks/demo_clean_clone.sh` runs it the way README command 1 does on a fresh clone and
passes the time the install took, so the file holds the newcomer's whole wait.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

from fedsilo.cli.main import main as fedsilo_main
from fedsilo.server.run_folder import RunFolder
from fedsilo.training.precision import cpu_flags, cpu_model, has_native_bf16

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-run", type=Path, default=Path("runs") / "bench-demo")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo.json")
    parser.add_argument("--install-seconds", type=float, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    status = fedsilo_main(["demo", "--out", str(args.out_run)])
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"demo failed with exit status {status}")
    folder = RunFolder(args.out_run)
    metrics = folder.read_metrics()
    before, after = metrics[0], metrics[-1]
    keys = (
        "gold_accuracy",
        "gold_category_accuracy",
        "gold_category_accuracy_ci95",
        "gold_loss",
        "gold_parts",
    )
    per_round = (
        "round",
        "sites_ok",
        "train_loss",
        "gold_accuracy",
        "gold_category_accuracy",
        "gold_category_accuracy_ci95",
        "gold_loss",
        "tokens",
        "train_seconds",
        "train_tokens_per_s",
        "padding_share",
        "precision",
        "gold_parts",
        "seconds",
    )
    trained = metrics[1:]
    # Rounds after which the gold set was not scored ([evaluation] every_rounds) time training
    # and aggregation alone; the others also hold one scoring of the gold set.
    unscored = [m for m in trained if "gold_accuracy" not in m] or trained
    mean_round = sum(m["seconds"] for m in unscored) / len(unscored)
    scorings = sum(1 for m in metrics if "gold_accuracy" in m)
    result = {
        "benchmark": "demo-gold-quality",
        "config": (folder.config_path).read_text(encoding="utf-8"),
        "base_model_hash": folder.read_json(folder.run_info_path)["base_model_hash"],
        "rounds": after["round"],
        "gold_count": after["gold_count"],
        "before": {k: before[k] for k in keys},
        "after": {k: after[k] for k in keys},
        "per_round": [{k: m.get(k) for k in per_round} for m in metrics],
        # Round 0 is the gold evaluation alone: its share of a training round is what scoring
        # the gold set costs.
        "evaluation_seconds": before["seconds"],
        "mean_round_seconds": mean_round,
        "evaluation_share_of_round": before["seconds"] / mean_round,
        "gold_scorings": scorings,
        "evaluation_share_of_wall": scorings * before["seconds"] / wall,
        "wall_seconds": wall,
        "install_seconds": args.install_seconds,
        "total_seconds": None if args.install_seconds is None else args.install_seconds + wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # The demo's speed depends on whether `precision = auto` found native bf16.
            "cpu_model": cpu_model(),
            "native_bf16": has_native_bf16(cpu_flags()),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"before": result["before"], "after": result["after"], "wall_s": wall}))


if __name__ == "__main__":
    main()
