"""What privacy costs in accuracy: the demo federation at several privacy settings.

    python benchmarks/privacy_utility.py [--rounds 2] [--local-steps 8] [--settings no_dp,eps8,...]

Runs the embedded default federation (SmolLM2-135M-Instruct, 4 hospitals by specialty,
ICD-10-CM coding) once per privacy setting, with everything else equal. The default training
budget is smaller than the demo's (2 rounds of 8 local steps) so that five runs fit on two cores.
Settings: no DP; record-level DP-SGD at a target epsilon of 1, 3 and 8 for the whole run (each
site calibrates its own noise); and site-level DP at the coordinator (clipped updates, noise on
the sum). Each finished setting is written to benchmarks/results/privacy-utility.json at once,
and a rerun skips the settings already there (``--force`` reruns them), so an interrupted
benchmark loses at most one setting; settings may run in parallel processes.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import time
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fedsilo.config import FedsiloConfig, parse_config
from fedsilo.server.progress import LogReporter
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.engines import SimulationRequest, simulate
from fedsilo.storage import write_text_atomic

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "privacy-utility.json"

RECORD_DP = {"record_level": True, "max_grad_norm": 1.0, "delta": 1e-5}
SETTINGS: dict[str, dict[str, Any]] = {
    "no_dp": {},
    "eps8": {**RECORD_DP, "target_epsilon": 8.0},
    "eps3": {**RECORD_DP, "target_epsilon": 3.0},
    "eps1": {**RECORD_DP, "target_epsilon": 1.0},
    "site_level": {"site_level": True, "site_clip_norm": 1.0, "site_noise_multiplier": 1.0},
}
METRIC_KEYS = ("gold_accuracy", "gold_category_accuracy", "gold_loss")


def _config(
    privacy: dict[str, Any], *, rounds: int, local_steps: int, threads: int
) -> FedsiloConfig:
    text = resources.files("fedsilo.configs").joinpath("demo.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    data["run"].update({"rounds": rounds, "torch_threads": threads, "name": "privacy-utility"})
    data["train"]["local_steps"] = local_steps
    data["privacy"] = privacy
    return parse_config(data, source="privacy utility benchmark")


def _run(name: str, config: FedsiloConfig, run_dir: Path) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    simulate(
        SimulationRequest(config=config, run_dir=run_dir, resume=False, reporter=LogReporter())
    )
    metrics = RunFolder(run_dir).read_metrics()
    final = metrics[-1]
    return {
        "setting": name,
        "privacy": config.privacy.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json"),
        "final": {key: final[key] for key in METRIC_KEYS},
        "epsilon": final.get("epsilon"),
        "site_level_epsilon": final.get("site_level_epsilon"),
        "delta": final.get("delta"),
        "per_round": [{"round": m["round"], **{k: m[k] for k in METRIC_KEYS}} for m in metrics],
        "gold_count": final["gold_count"],
        "seconds": time.perf_counter() - started,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--runs", type=Path, default=Path("runs") / "privacy-utility")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {sorted(SETTINGS)}")

    for name in names:
        result = _load()
        done = result.get("settings", {})
        same = name in done and done[name]["train"]["local_steps"] == args.local_steps
        if same and not args.force and done[name]["per_round"][-1]["round"] == args.rounds:
            print(f"{name}: already measured, skipped (use --force to rerun)")
            continue
        config = _config(
            SETTINGS[name], rounds=args.rounds, local_steps=args.local_steps, threads=args.threads
        )
        row = _run(name, config, args.runs / name)
        print(name, json.dumps({"final": row["final"], "epsilon": row["epsilon"]}))
        # Settings may run in parallel processes: merge under a lock on the results folder,
        # so no process overwrites another's row.
        RESULTS.mkdir(parents=True, exist_ok=True)
        folder = os.open(RESULTS, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            _save(name, row, config, args)
        finally:
            os.close(folder)
    print(f"wrote {OUT}")


def _save(name: str, row: dict[str, Any], config: FedsiloConfig, args: argparse.Namespace) -> None:
    result = _load()
    result.update(
        {
            "benchmark": "privacy-utility",
            "model": config.model.base,
            "task": config.task.model_dump(mode="json"),
            "train": config.train.model_dump(mode="json"),
            "rounds": args.rounds,
            "threads": args.threads,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        }
    )
    result.setdefault("settings", {})[name] = row
    write_text_atomic(OUT, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
