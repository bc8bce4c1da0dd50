"""The docs/benchmarks.md section for benchmarks/results/deployment*.json (used by report.py)."""

from __future__ import annotations

import statistics
from typing import Any


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _one(result: dict[str, Any]) -> list[str]:
    train = result["train"]
    fresh = result["fresh_clientapp_process_seconds"]
    lines = [
        f"### `{result['model']}`: {result['sites']} sites, {result['rounds']} rounds, "
        f"{train['local_steps']} local steps of {train['batch_size']}",
        "",
        f"Machine: {result['machine']}; other work was running, so timings are noisy "
        f"(measured {result['measured_at']}).",
        "",
        "| run | per round (s) | steady median (s) | vs simulation |",
        "|---|---|---:|---:|",
        f"| simulation (in-process) | {_seconds(result['simulation_round_seconds'])} | "
        f"{result['simulation_steady_median_s']:.2f} | |",
    ]
    for deployed in result["deployments"]:
        lines.append(
            f"| deployment | {_seconds(deployed['round_seconds'])} | "
            f"{deployed['steady_median_s']:.2f} | {100 * deployed['overhead']:+.0f}% |"
        )
    lines += ["", "| what | seconds |", "|---|---|"]
    for deployed in result["deployments"]:
        tasks = deployed["site_train_task_seconds"]
        lines.append(
            "| a site's train task in its worker (pull, train, push; model already loaded), "
            "median | "
            f"{statistics.median(tasks):.2f} (n={len(tasks)}) |"
        )
        for name, value in deployed["join_seconds"].items():
            lines.append(f"| `fedsilo site start` to joined, {name} | {value:.1f} |")
    lines += [
        "| a fresh process importing fedsilo's ClientApp and loading the model (what Flower's "
        "subprocess isolation pays for every message), median of "
        f"{len(fresh)} | {statistics.median(fresh):.1f} |",
        "",
    ]
    return lines


def deployment_section(results: list[dict[str, Any]]) -> list[str]:
    """Deployment vs simulation round latency, site join time, per-message process cost."""
    lines = ["## Deployment on Flower's engine vs simulation", ""]
    if not results:
        return [*lines, "Not measured yet: run `python benchmarks/deployment.py`.", ""]
    lines += [
        "`python benchmarks/deployment.py` runs the same 3-site federation (same config file, "
        "seed and data) in simulation (the in-process engine: sites take turns in one process) "
        "and deployed on 127.0.0.1 (SuperLink behind nginx, TLS, SuperNode authentication, one "
        "`fedsilo site start` process per site with its long-lived worker). Round latency is "
        "the run's own per-round `seconds` (tasks sent to "
        "evaluated checkpoint); the steady state is the median of rounds 2 and later. Goal: "
        "deployment < +15% per round once the model stays loaded. What deployment adds is "
        "transport and waiting: Flower moves each array of a message as its own object (one "
        "HTTPS request each, through nginx), the SuperNode waits 3 s after an empty pull, the "
        "worker and the coordinator poll every 0.2 s and 0.25 s (Flower's HttpGrid: 3 s), plus "
        "TLS and serialization. On this one machine the deployed sites also train at the same "
        "time, three single-thread processes on two shared cores, while simulated sites take "
        "turns on one: with a model whose training dominates, that contention, not the "
        "transport, is most of the difference, and it says nothing about sites on their own "
        "machines. The goal is therefore not shown met here.",
        "",
    ]
    for result in results:
        lines += _one(result)
    return lines
