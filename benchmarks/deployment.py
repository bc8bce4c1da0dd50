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
import shutil
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
    # The same run as a simulation: no deployment, and each simulated site gets its own key.
    federation = config.federation.model_copy(update={"sites": ()})
    run = config.run.model_copy(update={"require_site_policies": False})
    config = config.model_copy(update={"deployment": None, "federation": federation, "run": run})
    simulate(SimulationRequest(config=config, run_dir=out, resume=False, reporter=_Quiet()))
    return _round_seconds(out)


def _deploy(root: Path, model: Path | str, rounds: int, train: dict[str, Any]) -> dict[str, Any]:
    deployment = build_deployment(
        root,
        model,
        rounds=rounds,
        round_timeout_s=1800.0,
        train=train,
    )
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

            def joined(name: str = name) -> bool:
                return f"site {name} joined" in coordinator.log()

            wait_for(
                joined,
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


def _fresh_process_seconds(model: Path | str, repeats: int) -> list[float]:
    code = (
        "import fedsilo.client.app, fedsilo.deploy.site_worker; "
        "from fedsilo.model.base import load_base_model, resolve_base_model; "
        f"load_base_model(resolve_base_model({str(model)!r}))"
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
    parser.add_argument("--model", default="tiny", help="'tiny', a model folder or name")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-deployment")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/deployment.json")
    args = parser.parse_args()
    args.work = args.work.resolve()  # the processes it starts run in other folders
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model: Path | str = (
        write_tiny_llama(args.work / "tiny-llama", seed=0) if args.model == "tiny" else args.model
    )
    train = {"local_steps": args.local_steps, "batch_size": args.batch_size}
    # The simulation runs the deployment's own config file (built, not started).
    config_path = build_deployment(
        args.work / "sim-config", model, rounds=args.rounds, train=train
    ).config_path
    simulated = _simulate(config_path, args.work / "simulated")
    sim_steady = statistics.median(simulated[1:])
    deployed = _deploy(args.work / "deployed", model, args.rounds, train)
    steady = statistics.median(deployed["round_seconds"][1:])
    deployments = [{**deployed, "steady_median_s": steady, "overhead": steady / sim_steady - 1.0}]
    fresh = _fresh_process_seconds(model, repeats=3)
    result = {
        "model": "tiny random Llama (tests)" if args.model == "tiny" else str(args.model),
        "sites": len(SITES),
        "rounds": args.rounds,
        "train": train,
        "machine": f"{platform.machine()}, Python {platform.python_version()}, shared 2-core box",
        "simulation_round_seconds": simulated,
        "simulation_steady_median_s": sim_steady,
        "deployments": deployments,
        "fresh_clientapp_process_seconds": fresh,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
