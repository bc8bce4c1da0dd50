"""Scale run: 10, 30 and 100 simulated sites on the tiny model; round time and memory.

    python benchmarks/scale.py [--sites 10 30 100] [--rounds 2] [--rank 32]

Each site count runs in a fresh process (so peak memory is that run's alone): the real
ServerApp and ClientApp over the in-process grid, every site training ``--steps`` batches per
round on one torch thread, one after another. Reported per site count: seconds per round,
the process's resident memory just before round 1 (model loaded, round 0 evaluated) and its
peak during the rounds (sampled every 5 ms), and the adapter bytes a round moves.

The in-process simulation runs the sites in the coordinator's process; training one site
needs the same memory whatever the number of sites, so the growth of the peak with the
number of sites is what the coordinator holds per round (messages out, replies in). Writes
benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * _PAGE


class _PeakSampler:
    """Samples this process's resident memory in a thread and keeps the highest value."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def start(self) -> None:
        self.peak = _rss_bytes()
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_bytes())


def _one(num_sites: int, rounds: int, rank: int, steps: int) -> dict[str, Any]:
    """One run in this process; prints its result as JSON."""
    import torch

    from fedsilo.config import parse_config
    from fedsilo.model.tiny import write_tiny_llama
    from fedsilo.server.run_folder import RunFolder
    from fedsilo.simulation.engines import SimulationRequest, simulate

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="fedsilo-scale-"))
    model_dir = write_tiny_llama(work / "tiny", seed=0)
    config = parse_config(
        {
            "run": {
                "name": f"scale-{num_sites}",
                "rounds": rounds,
                "torch_threads": 1,
                "require_site_policies": False,
            },
            "model": {"base": str(model_dir)},
            "lora": {"rank": rank, "alpha": 2.0 * rank},
            "task": {
                "name": "icd10",
                "num_sites": num_sites,
                "partition": "dirichlet",
                "alpha": 1.0,
                "examples_per_site": 4,
                "gold_size": 8,
                # 100 Dirichlet sites need a larger pool than the default chapters give.
                "chapters": ["4", "9", "10", "13", "2", "5", "6", "11"],
            },
            "train": {"local_steps": steps, "batch_size": 2, "max_length": 64},
            "strategy": {"name": "fedavg", "min_sites": num_sites},
            "evaluation": {"max_new_tokens": 4},
        },
        source="scale benchmark",
    )
    sampler = _PeakSampler()
    before_rounds: dict[str, int] = {}

    class Reporter:
        def round_done(self, record: dict[str, Any], *, total_rounds: int) -> None:
            if record["round"] == 0:
                before_rounds["rss"] = _rss_bytes()
                sampler.start()

        def notice(self, text: str) -> None:
            print(text, file=sys.stderr)

    started = time.perf_counter()
    simulate(
        SimulationRequest(config=config, run_dir=work / "run", resume=False, reporter=Reporter())
    )
    wall = time.perf_counter() - started
    peak = sampler.stop()
    metrics = RunFolder(work / "run").read_metrics()
    rows = [m for m in metrics if m["round"] > 0]
    return {
        "sites": num_sites,
        "round_seconds": [m["seconds"] for m in rows],
        "adapter_bytes": rows[-1]["bytes_up_per_site"],
        "bytes_up_per_round": rows[-1]["bytes_up_per_site"] * rows[-1]["sites_ok"],
        "rss_before_rounds_mb": before_rounds["rss"] / 2**20,
        "peak_rss_during_rounds_mb": peak / 2**20,
        "growth_during_rounds_mb": (peak - before_rounds["rss"]) / 2**20,
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (sets the adapter size)")
    parser.add_argument("--steps", type=int, default=1, help="local steps per round")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(_one(args.one, args.rounds, args.rank, args.steps)))
        return

    runs = []
    for num_sites in args.sites:
        command = [
            sys.executable, __file__, "--one", str(num_sites), "--rounds", str(args.rounds),
            "--rank", str(args.rank), "--steps", str(args.steps),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{num_sites} sites failed:\n{done.stderr[-4000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)

    first, last = runs[0], runs[-1]
    extra_sites = last["sites"] - first["sites"]
    result = {
        "benchmark": "scale",
        "model": f"tiny random Llama (tests/conftest.py), LoRA rank {args.rank} on all projections",
        "rounds": args.rounds,
        "local_steps": args.steps,
        "runs": runs,
        "growth_per_extra_site_mb": (
            (last["peak_rss_during_rounds_mb"] - first["peak_rss_during_rounds_mb"]) / extra_sites
            if extra_sites
            else None
        ),
        "adapter_mb": last["adapter_bytes"] / 2**20,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": 1},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "measured while the 2-core machine was shared with other work: timings are noisy",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
