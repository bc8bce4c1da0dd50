"""One quality results file from several processes that measured parts of it.

On a machine with one torch thread per core, two algorithms of one benchmark run fastest as
two processes, each writing its own results file (two processes never write one file). This
folds the algorithms of such files into one, after checking that every file measured the same
benchmark: same task, model, base model, budget, training and LoRA settings, data, gold set
and untrained score. An algorithm measured in two files is refused rather than picked.

Parts measured on different CPUs score the same untrained adapter a little differently (bf16
kernels round differently: on the 8-specialty ICD-10 gold set, gold loss 4.620 on an AMD Zen 5
and 4.591 on an Intel Xeon with AMX, from the same code). ``other_cpu=True`` lets such parts be
merged: every other field must still be equal, each part's untrained score is kept in its
``merged_from`` entry, and ``round0_differs`` says that the parts' starting scores differ.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsilo.bench.quality import IDENTITY_FIELDS, summarize_goals
from fedsilo.storage import write_text_atomic

# Fields that say which benchmark a results file measured: all must be equal to merge. Beyond
# what a resumed run checks, the data and gold set that follow from them, and how the
# hyperparameters were chosen.
SAME_BENCHMARK_FIELDS = (
    "benchmark",
    *IDENTITY_FIELDS,
    "task_settings",
    "metric",
    "sites",
    "validation_count",
    "gold_count",
    "hyperparameters",
)
# The untrained adapter's gold scores: the same seeded start on the same gold set, so equal up
# to the last bits a different CPU may round differently.
ROUND0_RELATIVE_TOLERANCE = 1e-6


class MergeError(ValueError):
    """Results files that are not parts of one benchmark; names the file and field."""


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MergeError(f"{path}: not a readable results file ({error})") from error
    if not isinstance(data, dict) or data.get("benchmark") != "quality":
        raise MergeError(f"{path}: not a quality benchmark results file")
    return data


def _same_round0(mine: dict[str, Any], theirs: dict[str, Any]) -> bool:
    if mine.keys() != theirs.keys():
        return False
    for key, value in mine.items():
        other = theirs[key]
        if isinstance(value, float) and isinstance(other, float):
            if not math.isclose(value, other, rel_tol=ROUND0_RELATIVE_TOLERANCE):
                return False
        elif value != other:
            return False
    return True


def _same_budget_but_mu_grid(reference: dict[str, Any], data: dict[str, Any]) -> bool:
    """Whether the budgets differ at most in FedProx's mu grid, with every mu the part measured
    in the target's grid: a part that ran one mu of the grid (``--mu 0.01``) measured the
    same benchmark, one ``fedprox-mu<mu>`` algorithm of it."""
    mine, theirs = reference.get("budget"), data.get("budget")
    if not isinstance(mine, dict) or not isinstance(theirs, dict):
        return False
    grid = "proximal_mus"
    if {k: v for k, v in mine.items() if k != grid} != {
        k: v for k, v in theirs.items() if k != grid
    }:
        return False
    names = {f"fedprox-mu{mu:g}" for mu in mine.get(grid) or []}
    measured = {name for name in data.get("algorithms", {}) if name.startswith("fedprox-mu")}
    return measured <= names


def _check_same_benchmark(
    reference: dict[str, Any],
    reference_path: Path,
    data: dict[str, Any],
    path: Path,
    *,
    other_cpu: bool,
) -> None:
    for key in SAME_BENCHMARK_FIELDS:
        if key == "budget" and _same_budget_but_mu_grid(reference, data):
            continue
        if data.get(key) != reference.get(key):
            raise MergeError(
                f"{path}: field {key!r} differs from {reference_path} ({data.get(key)!r} there, "
                f"{reference.get(key)!r} in {reference_path}): not the same benchmark"
            )
    if not other_cpu and not _same_round0(reference.get("round0", {}), data.get("round0", {})):
        raise MergeError(
            f"{path}: field 'round0' (the untrained adapter's gold scores) differs from "
            f"{reference_path}: not the same gold set or starting adapter (parts measured on "
            "different CPUs: --other-cpu)"
        )
    sizes, other_sizes = (d.get("edge_cases", {}).get("sizes") for d in (reference, data))
    if sizes is not None and other_sizes is not None and sizes != other_sizes:
        raise MergeError(f"{path}: edge-case set sizes differ from {reference_path}")


def _part(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """What the merged file keeps of each part: where and when it was measured."""
    return {
        "results": str(path),
        "algorithms": sorted(data.get("algorithms", {})),
        "out_dir": data.get("out_dir"),
        "complete": bool(data.get("complete")),
        "wall_seconds": data.get("wall_seconds"),
        "machine": data.get("machine"),
        "measured_at": data.get("measured_at"),
        "command": data.get("command"),
        "round0": data.get("round0"),
    }


def merge_quality_results(
    into: Path, sources: Sequence[Path], *, other_cpu: bool = False
) -> dict[str, Any]:
    """Add the algorithms of ``sources`` to the results file ``into``; write and return it.

    ``into`` keeps its own fields (run folder, machine); the algorithms, edge-case scores and
    goals become the union's, ``complete`` holds only if every part is complete, wall time is
    the parts' sum (compute spent, not elapsed) and peak memory the largest part's. Each part
    is listed under ``merged_from``, with its untrained score. ``other_cpu``: the parts'
    untrained scores may differ (see the module's docstring). Nothing is written when any
    check fails.
    """
    if not sources:
        raise MergeError("nothing to merge: name at least one results file besides the target")
    merged = _load(into)
    # Parts merged before without other_cpu started where INTO starts (that merge checked it).
    parts = [
        {**part, "round0": part.get("round0") or merged["round0"]}
        for part in merged.get("merged_from") or [_part(into, merged)]
    ]
    algorithms: dict[str, Any] = dict(merged.get("algorithms", {}))
    owner = {name: into for name in algorithms}
    edge: dict[str, Any] = dict(merged.get("edge_cases", {}))
    for path in sources:
        if path.resolve() == into.resolve():
            raise MergeError(f"{path}: is the target itself")
        data = _load(path)
        _check_same_benchmark(merged, into, data, path, other_cpu=other_cpu)
        for name, result in data.get("algorithms", {}).items():
            if name in algorithms:
                raise MergeError(
                    f"{path}: algorithm {name!r} is also measured in {owner[name]}; "
                    "keep one of them (remove it from a file) before merging"
                )
            algorithms[name] = result
            owner[name] = path
            if name in data.get("edge_cases", {}):
                edge[name] = data["edge_cases"][name]
        if "sizes" in data.get("edge_cases", {}):
            edge.setdefault("sizes", data["edge_cases"]["sizes"])
        merged["complete"] = bool(merged.get("complete")) and bool(data.get("complete"))
        merged["wall_seconds"] = float(merged.get("wall_seconds", 0.0)) + float(
            data.get("wall_seconds", 0.0)
        )
        merged["peak_rss_mb"] = max(
            float(merged.get("peak_rss_mb", 0.0)), float(data.get("peak_rss_mb", 0.0))
        )
        merged["measured_at"] = max(
            str(merged.get("measured_at", "")), str(data.get("measured_at", ""))
        )
        parts.append(_part(path, data))
    merged["algorithms"] = algorithms
    merged["edge_cases"] = edge
    merged["goals"] = summarize_goals(algorithms, merged["round0"])
    merged["merged_from"] = parts
    starts: list[dict[str, Any]] = [part["round0"] for part in parts if part.get("round0")]
    merged["round0_differs"] = any(not _same_round0(starts[0], start) for start in starts[1:])
    write_text_atomic(into, json.dumps(merged, indent=2) + "\n")
    return merged
