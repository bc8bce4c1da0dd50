"""Seeds of the quality benchmark summed up: mean, 95% interval and share of centralized.

``benchmarks/results/quality-summary.json`` holds, per task and algorithm, the seeds measured,
their values of the task's headline metric (ICD-10: category accuracy on gold part a; other
tasks: their accuracy), the mean, a 95% Student t-interval over the seeds' values and the ratio
of the mean to centralized's mean over the same seeds. Local-only appears twice: the mean over
sites (``local-mean``) and the worst site (``local-worst``). Each algorithm's learning curve
(headline per round, mean over seeds) is kept beside it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsilo.bench.settings import headline_metric
from fedsilo.storage import folder_lock, write_text_atomic

INTERVAL = (
    "95% Student t-interval over the seeds' values: mean +- t(0.975, n-1) * sd / sqrt(n), "
    "cut to the range [0, 1] an accuracy can take (null with one seed)"
)


# t(0.975, df) for df = 1..30, from the Student t distribution (standard tables).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """t(0.975, df); beyond 30 degrees of freedom df=30's value (slightly wide, never narrow)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    return _T975[min(df, len(_T975)) - 1]


def t_interval(
    values: Sequence[float], *, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> list[float] | None:
    """The 95% t-interval of the mean of ``values`` (None for fewer than two values), cut to
    ``bounds``, the range the values can take (an accuracy's interval never goes below 0)."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = t_quantile_975(len(values) - 1) * sd / math.sqrt(len(values))
    low, high = bounds
    return [max(low, mean - half), min(high, mean + half)]


def _final(result: Mapping[str, Any], key: str) -> dict[str, float]:
    """The headline of each reported variant of one algorithm's result."""
    if "final_mean" in result:  # local-only
        return {"-mean": result["final_mean"][key], "-worst": result["final_worst"][key]}
    return {"": result["per_round"][-1][key]}


def summarize_seeds(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One task's summary from its per-seed results files (``seed -> results``)."""
    if not per_seed:
        raise ValueError("no results to summarize")
    first = per_seed[min(per_seed)]
    key = headline_metric(first["task_settings"]["name"])
    values: dict[str, dict[int, float]] = {}
    curves: dict[str, dict[int, list[float]]] = {}
    for seed in sorted(per_seed):
        for name, result in per_seed[seed]["algorithms"].items():
            for suffix, value in _final(result, key).items():
                values.setdefault(name + suffix, {})[seed] = float(value)
            for row in result.get("per_round", []):
                curves.setdefault(name, {}).setdefault(int(row["round"]), []).append(row[key])
    central = values.get("centralized", {})
    algorithms: dict[str, Any] = {}
    for name, by_seed in values.items():
        seeds = sorted(by_seed)
        series = [by_seed[s] for s in seeds]
        common = [s for s in seeds if s in central]
        reference = sum(central[s] for s in common) / len(common) if common else 0.0
        ratio = sum(by_seed[s] for s in common) / len(common) / reference if reference > 0 else None
        algorithms[name] = {
            "seeds": seeds,
            "values": series,
            "mean": sum(series) / len(series),
            "ci95": t_interval(series, bounds=(0.0, 1.0)),
            "ratio_to_centralized": ratio,
        }
        if name in curves:
            algorithms[name]["curve_mean"] = [
                [round_number, sum(v) / len(v)] for round_number, v in sorted(curves[name].items())
            ]
    return {
        "headline": key,
        "headline_meaning": first["metric_meaning"][key],
        "interval": INTERVAL,
        "ratio_to_centralized": "mean over the seeds both have / centralized's mean over them",
        "algorithms": algorithms,
    }


def seed_results_path(base: Path, seed: int) -> Path:
    """Seed 0 writes ``base`` itself; seed s writes ``base``'s name with ``-seed<s>``."""
    return base if seed == 0 else base.with_name(f"{base.stem}-seed{seed}{base.suffix}")


def _identity(data: Mapping[str, Any]) -> dict[str, Any]:
    budget = {k: v for k, v in data.get("budget", {}).items() if k != "seed"}
    return {"task": data.get("task"), "model": data.get("model"), "budget": budget}


def update_summary(summary_path: Path, task: str, results_paths: Sequence[Path]) -> dict[str, Any]:
    """Recompute ``task``'s entry of the summary file from its per-seed results files.

    Only files measured with the same settings as the first (task, model and budget but for
    the seed) are combined; the others, left from another budget, are listed under
    ``skipped_files`` and not counted, as is a file whose seed an earlier file already gave.
    Several benchmark processes may finish together: the summary is re-read and rewritten
    under a lock on its folder, so none drops another's entry.
    """
    entry = _summary_entry(results_paths)
    with folder_lock(summary_path.parent):
        summary: dict[str, Any] = {"benchmark": "quality-summary", "tasks": {}}
        if summary_path.exists():
            try:
                summary = json.loads(summary_path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{summary_path}: not a summary file ({error})") from error
        summary.setdefault("tasks", {})[task] = entry
        write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary


def _summary_entry(results_paths: Sequence[Path]) -> dict[str, Any]:
    per_seed: dict[int, dict[str, Any]] = {}
    used: list[str] = []
    skipped: list[str] = []
    reference: dict[str, Any] | None = None
    for path in results_paths:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a results file ({error})") from error
        identity = _identity(data)
        reference = identity if reference is None else reference
        seed = int(data["budget"]["seed"])
        if identity != reference or seed in per_seed:
            skipped.append(str(path))
            continue
        per_seed[seed] = data
        used.append(str(path))
    entry = summarize_seeds(per_seed)
    entry["results_files"] = used
    entry["skipped_files"] = skipped
    return entry


def drop_summary_entries(summary_path: Path, results_paths: Sequence[Path]) -> list[str]:
    """Remove the summary's entries that rest only on ``results_paths`` (parts folded into
    another results file); returns their names. A missing summary has none."""
    if not summary_path.exists():
        return []
    parts = {Path(p).resolve() for p in results_paths}
    with folder_lock(summary_path.parent):
        summary = json.loads(summary_path.read_text())
        tasks: dict[str, Any] = summary.get("tasks", {})
        dropped = [
            name
            for name, entry in tasks.items()
            if entry.get("results_files")
            and all(Path(f).resolve() in parts for f in entry["results_files"])
        ]
        if dropped:
            for name in dropped:
                del tasks[name]
            write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return dropped


def _seed_suffix(path: Path) -> tuple[str, int | None]:
    """(the stem without ``-seed<s>``, s) for a seed file; (the stem, None) for any other."""
    stem, _, seed = path.stem.rpartition("-seed")
    return (stem, int(seed)) if stem and seed.isdigit() else (path.stem, None)


def seed_in_name(path: Path) -> int | None:
    """The seed a ``-seed<s>`` results file names; None for a seed-0 (family) file."""
    return _seed_suffix(path)[1]


def seed_family_base(path: Path) -> Path:
    """The seed-0 file of ``path``'s seeds: ``path`` without its ``-seed<s>``, if it has one."""
    stem, _ = _seed_suffix(path)
    return path.with_name(f"{stem}{path.suffix}")


def summary_label(base: Path) -> str:
    """The summary entry a seed-0 results file ``quality-T.json`` is listed under: ``T``."""
    return base.stem.removeprefix("quality-")


def seed_results_files(base: Path) -> list[Path]:
    """``base`` and its ``-seed<s>`` siblings that exist, seed 0 first."""
    found = [base] if base.exists() else []
    siblings = base.parent.glob(f"{base.stem}-seed*{base.suffix}")
    numbered = sorted((seed, p) for p in siblings if (seed := _seed_suffix(p)[1]) is not None)
    return found + [p for _, p in numbered]
