"""Deployment vs simulation: round latency, the time for a site to join, per-message start-up.

    python benchmarks/deployment.py [--rounds 4] [--model tiny|PATH] [--out FILE]

Runs the same 3-site federation (same config, seed and data) twice on this machine:

- simulation: `fedsilo simulate` with the in-process engine (sites take turns in one process);
- deployment: `fedsilo coordinator start` (SuperLink behind nginx, TLS, SuperNode
  authentication) and three `fedsilo site start` processes on 127.0.0.1, each site joining
  one after the other so the time from `fedsilo site start` to "joined" is measured per site.

Round latency is each round's `seconds` in RUN/metrics.jsonl (from sending the tasks to the
checkpointed, evaluated result), rounds 2.. only (round 1 includes first-use costs in both).
It also times what Flower's default subprocess isolation would add to every message: a fresh
Python process importing fedsilo's ClientApp and loading the model (measured as exactly that
process, not as a Flower run). Results: benchmarks/results/deployment.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the local-deployment harness lives with the tests

import torch  # noqa: E402
from tests.deploy.harness import SITES, build_deployment, wait_for  # noqa: E402

from fedsilo.config import load_config  # noqa: E402
from fedsilo.model.tiny import write_tiny_llama  # noqa: E402
from fedsilo.simulation.engines import SimulationRequest, simulate  # noqa: E402

torch.set_num_threads(1)


class _Quiet:
    def round_done(self, record: dict[str, Any], *, total_rounds: int) -> None:
        pass

    def notice(self, text: str) -> None:
        pass


def _round_seconds(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["seconds"] for line in lines if json.loads(line)["round"] > 0]


def _simulate(config_path: Path, out: Path) -> list[float]:
    config = load_config(config_path)
    config = config.model_copy(update={"deployment": None})
    simulate(SimulationRequest(config=config, run_dir=out, resume=False, reporter=_Quiet()))
    return _round_seconds(out)


def _deploy(root: Path, model: Path, rounds: int) -> dict[str, Any]:
    deployment = build_deployment(root, model, rounds=rounds, round_timeout_s=600.0)
    coordinator = deployment.start_coordinator()
    joins: dict[str, float] = {}
    try:
        wait_for(
            lambda: "enrolled site gamma" in coordinator.log(),
            timeout=300,
            what="the coordinator to be ready",
            watch=[coordinator],
        )
        sites = []
        for name in SITES:
            started = time.monotonic()
            sites.append(deployment.start_site(name))
            wait_for(
                lambda name=name: f"site {name} joined" in coordinator.log(),
                timeout=300,
                what=f"{name} to join",
                watch=[coordinator, *sites],
            )
            joins[name] = time.monotonic() - started
        if coordinator.process.wait(timeout=3600) != 0:
            raise RuntimeError(f"the deployed run failed:\n{coordinator.log()[-3000:]}")
        answered = [
            float(m)
            for s in sites
            for m in re.findall(r"task train \(group \d+\) answered in ([0-9.]+) s", s.log())
        ]
    finally:
        deployment.close()
    return {
        "round_seconds": _round_seconds(deployment.run_dir),
        "join_seconds": joins,
        "site_train_task_seconds": answered,
    }


def _fresh_process_seconds(model: Path, repeats: int) -> list[float]:
    code = (
        "import fedsilo.client.app, fedsilo.deploy.site_worker; "
        "from fedsilo.model.base import load_base_model; "
        f"load_base_model(__import__('pathlib').Path({str(model)!r}))"
    )
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model", default="tiny", help="'tiny' or a local model folder")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-deployment")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/deployment.json")
    args = parser.parse_args()
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model = (
        write_tiny_llama(args.work / "tiny-llama", seed=0)
        if args.model == "tiny"
        else Path(args.model)
    )
    deployed = _deploy(args.work / "deployed", model, args.rounds)
    config_path = args.work / "deployed" / "coordinator" / "federation.toml"
    simulated = _simulate(config_path, args.work / "simulated")
    fresh = _fresh_process_seconds(model, repeats=3)
    sim_steady = statistics.median(simulated[1:])
    dep_steady = statistics.median(deployed["round_seconds"][1:])
    result = {
        "model": "tiny random Llama (tests)" if args.model == "tiny" else str(args.model),
        "sites": len(SITES),
        "rounds": args.rounds,
        "machine": f"{platform.machine()}, {platform.python_version()}, shared 2-core box",
        "simulation_round_seconds": simulated,
        "deployment_round_seconds": deployed["round_seconds"],
        "simulation_steady_median_s": sim_steady,
        "deployment_steady_median_s": dep_steady,
        "overhead": dep_steady / sim_steady - 1.0,
        "join_seconds": deployed["join_seconds"],
        "site_train_task_seconds": deployed["site_train_task_seconds"],
        "fresh_clientapp_process_seconds": fresh,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
