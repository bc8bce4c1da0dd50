"""The record-level DP recipe at a site's real size, and the federations its benchmarks run.

The recipe follows the published ones that keep most of the non-private utility (Li et al.
ICLR 2022; Yu et al. ICLR 2022): large expected batches drawn by Poisson sampling (memory
stays bounded: per-example gradients are taken in micro-batches), local work counted in epochs
over the site's own records, and the run's target epsilon split over its rounds by the
accountant (each site calibrates one noise multiplier for all its planned rounds). The noise on
each averaged gradient is ``noise_multiplier * max_grad_norm / expected_batch_size``, so a
large expected batch is what makes DP affordable.

Three federations are built from it, all on the ICD-10 task with whole specialties per site:

- :func:`utility_config`: the sites' records and the held-out gold set (headline part a,
  unseen codes of trained categories), for the privacy/utility table;
- :func:`attack_config`: the same sites with canaries planted in the first and records of the
  first site held out, for the canary and membership attacks on the trained model;
- :func:`validation_config`: each site's own records split into training and validation, the
  validation records of all sites pooled as the run's evaluation set. Hyperparameters are
  chosen on it; the gold set is never looked at.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fedsilo.config import FedsiloConfig, parse_config
from fedsilo.config.schema import DEFAULT_TARGET_MODULES
from fedsilo.data.icd10 import build_icd10_task
from fedsilo.data.records import ChatRecord
from fedsilo.model.tiny import write_tiny_llama
from fedsilo.protocol.schedule import LrSchedule
from fedsilo.server.progress import LogReporter
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.canary_experiment import CanaryExperiment, write_attack_sites
from fedsilo.simulation.engines import SimulationRequest, simulate
from fedsilo.storage import folder_lock, write_text_atomic

# Four of the five ICD-10-CM chapters with at least 2,000 billable codes (the fifth, 20, is
# external causes): orthopedics (13), obstetrics (15), ophthalmology (7), trauma surgery (19).
# The demo's four chapters hold 310 to 6,619 codes, too few for 2,000 records at every site.
LARGE_CHAPTERS: tuple[str, ...] = ("13", "15", "7", "19")
DEFAULT_RECORDS_PER_SITE = 2000


@dataclass(frozen=True)
class DpRecipe:
    """How each site trains under record-level DP (and, with ``epsilon`` None, without it).

    ``expected_batch_size`` is Poisson sampling's expected batch (``q = B / records``);
    ``local_epochs`` is each round's local work in passes over the site's records;
    ``learning_rate`` and ``max_grad_norm`` are what the sweep (benchmarks/dp_sweep.py) chooses.
    ``lr_schedule``, ``warmup_rounds`` and ``server_momentum`` shape training across rounds as
    in ``[train]`` and ``[strategy]``: with specialty sites, many short rounds with momentum
    learn where a few long ones average divergent specialists into nothing. Gold (or
    validation) is scored every ``eval_every_rounds`` rounds and after the last.

    The defaults are the recipe benchmarks/results/dp-sweep-schedule.json chose at epsilon 8
    (lowest validation loss of the points measured; docs/privacy.md): at 2,000 records, 28
    rounds of 4 steps of expected batch 32.
    """

    expected_batch_size: int = 32
    local_epochs: float = 0.0625
    rounds: int = 28
    learning_rate: float = 2e-3
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    lora_rank: int = 16
    # The linear layers LoRA adapts. The noise on each step grows with the square root of the
    # number of trained parameters; DP-LoRA (Yu et al. ICLR 2022) adapts q and v only.
    lora_targets: tuple[str, ...] = DEFAULT_TARGET_MODULES
    ffa: bool = False
    max_length: int = 96
    lr_schedule: LrSchedule = "cosine"
    warmup_rounds: int = 2
    server_momentum: float = 0.7
    eval_every_rounds: int = 7

    def privacy(self, epsilon: float | None) -> dict[str, Any]:
        """The ``[privacy]`` section: record-level DP at ``epsilon`` for the run, or none."""
        if epsilon is None or math.isinf(epsilon):
            return {}
        return {
            "record_level": True,
            "target_epsilon": epsilon,
            "max_grad_norm": self.max_grad_norm,
            "delta": self.delta,
        }

    def to_json(self) -> dict[str, Any]:
        """The recipe as it reads back from a results file (lists, not tuples)."""
        return {**asdict(self), "lora_targets": list(self.lora_targets)}


# Recipe fields that change what is scored, not what is trained.
_EVALUATION_ONLY = frozenset({"eval_every_rounds"})


def training_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` (as stored) without its evaluation-only fields: what two trainings must share
    for one's accuracy to be read as a share of the other's."""
    return {key: value for key, value in recipe.items() if key not in _EVALUATION_ONLY}


@dataclass(frozen=True)
class Federation:
    """Who trains on what: the model, the sites and their size, the chapters."""

    model: str
    num_sites: int = 4
    records_per_site: int = DEFAULT_RECORDS_PER_SITE
    gold_size: int = 200
    chapters: tuple[str, ...] = LARGE_CHAPTERS
    seed: int = 0
    threads: int = 1


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags of the recipe's shape across rounds (see :class:`DpRecipe`)."""
    defaults = DpRecipe()
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    parser.add_argument(
        "--lora-targets",
        default=",".join(defaults.lora_targets),
        help="comma-separated linear layers LoRA adapts (default: all of them)",
    )
    parser.add_argument(
        "--lr-schedule", choices=("constant", "cosine"), default=defaults.lr_schedule
    )
    parser.add_argument("--warmup-rounds", type=int, default=defaults.warmup_rounds)
    parser.add_argument("--server-momentum", type=float, default=defaults.server_momentum)
    parser.add_argument(
        "--eval-every-rounds",
        type=int,
        default=defaults.eval_every_rounds,
        help="score the evaluation set before training, every N rounds and after the last",
    )


def schedule_from(args: argparse.Namespace, recipe: DpRecipe) -> DpRecipe:
    """``recipe`` with the flags of :func:`add_schedule_arguments` applied."""
    return replace(
        recipe,
        lora_rank=args.lora_rank,
        lora_targets=tuple(name.strip() for name in args.lora_targets.split(",") if name.strip()),
        lr_schedule=args.lr_schedule,
        warmup_rounds=args.warmup_rounds,
        server_momentum=args.server_momentum,
        eval_every_rounds=args.eval_every_rounds,
    )


def _config(
    federation: Federation, recipe: DpRecipe, epsilon: float | None, task: dict[str, Any]
) -> FedsiloConfig:
    return parse_config(
        {
            "run": {
                "name": "dp-recipe",
                "seed": federation.seed,
                "rounds": recipe.rounds,
                "torch_threads": federation.threads,
                "require_site_policies": False,
            },
            "model": {"base": federation.model},
            "lora": {
                "rank": recipe.lora_rank,
                "alpha": 2.0 * recipe.lora_rank,
                "target_modules": list(recipe.lora_targets),
                "ffa": recipe.ffa,
            },
            "task": task,
            "train": {
                "local_epochs": recipe.local_epochs,
                "batch_size": recipe.expected_batch_size,
                "learning_rate": recipe.learning_rate,
                "lr_schedule": recipe.lr_schedule,
                "warmup_rounds": recipe.warmup_rounds,
                "max_length": recipe.max_length,
                "max_grad_norm": recipe.max_grad_norm,
            },
            "strategy": {
                "name": "fedavg",
                "min_sites": federation.num_sites,
                "server_momentum": recipe.server_momentum,
            },
            "evaluation": {"max_new_tokens": 8, "every_rounds": recipe.eval_every_rounds},
            "privacy": recipe.privacy(epsilon),
        },
        source="DP recipe",
    )


def utility_config(
    federation: Federation, recipe: DpRecipe, *, epsilon: float | None
) -> FedsiloConfig:
    """The ICD-10 federation scored on its gold set, at record-level ``epsilon`` (None: no DP)."""
    task = {
        "name": "icd10",
        "num_sites": federation.num_sites,
        "partition": "by-chapter",
        "chapters": list(federation.chapters),
        "examples_per_site": federation.records_per_site,
        "gold_size": federation.gold_size,
    }
    return _config(federation, recipe, epsilon, task)


def _files_config(
    federation: Federation,
    recipe: DpRecipe,
    epsilon: float | None,
    sites: list[dict[str, str]],
    gold: Path,
    system_prompt: str | None,
) -> FedsiloConfig:
    """The recipe's federation on site files written to disk, scored on ``gold``."""
    task = {
        "name": "files",
        "sites": sites,
        "gold_path": str(gold),
        "system_prompt": system_prompt,
        "metric": "code",
    }
    return _config(federation, recipe, epsilon, task)


def _write_jsonl(path: Path, records: list[ChatRecord]) -> Path:
    lines = [json.dumps({"prompt": r.prompt, "response": r.response}) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def validation_config(
    federation: Federation,
    recipe: DpRecipe,
    *,
    epsilon: float | None,
    validation_share: float,
    work: Path,
) -> FedsiloConfig:
    """A federation on each site's training split, evaluated on the sites' validation splits.

    Each site draws ``records_per_site`` records of its own specialty, keeps the last
    ``validation_share`` of them for validation and trains on the rest; the pooled validation
    records are the run's evaluation set (its "gold" loss is the validation loss). The
    ICD-10 gold set is built (so its codes stay out of every site, as in the utility run) but
    never written or scored. Files are written to ``work``.

    Raises:
        ValueError: ``validation_share`` not in (0, 1), or a split left empty.
    """
    if not 0.0 < validation_share < 1.0:
        raise ValueError(f"validation_share must be in (0, 1), got {validation_share}")
    task = build_icd10_task(
        num_sites=federation.num_sites,
        partition="by-chapter",
        alpha=1.0,
        examples_per_site=federation.records_per_site,
        gold_size=federation.gold_size,
        seed=federation.seed,
        chapters=federation.chapters,
    )
    work.mkdir(parents=True, exist_ok=True)
    sites, validation = [], []
    for site in task.sites:
        records = [r for r in site.records if isinstance(r, ChatRecord)]
        held = max(1, round(len(records) * validation_share))
        if held >= len(records):
            raise ValueError(f"site {site.name}: {len(records)} records leave no training split")
        validation += records[-held:]
        path = _write_jsonl(work / f"{site.name}.jsonl", records[:-held])
        sites.append({"name": site.name, "path": str(path)})
    gold = _write_jsonl(work / "validation.jsonl", validation)
    return _files_config(federation, recipe, epsilon, sites, gold, task.system_prompt)


def attack_config(
    federation: Federation,
    recipe: DpRecipe,
    experiment: CanaryExperiment,
    *,
    epsilon: float | None,
    held_out: int,
    work: Path,
) -> FedsiloConfig:
    """The sites, recipe and gold codes of :func:`utility_config`, with the attacks' canaries
    and non-members.

    Each site draws ``records_per_site + held_out`` records of its specialty and trains on a
    random ``records_per_site`` of them (so not the same records as :func:`utility_config`);
    the first site's records also hold ``experiment``'s planted canaries and its next
    ``held_out`` records are the membership attack's non-members
    (:func:`fedsilo.simulation.canary_experiment.write_attack_sites`). Scored on the gold set,
    whose trained categories are judged on the larger draw: a gold code may rarely have a
    category whose drawn codes all fell outside the trained records.

    Raises:
        ValueError: ``held_out`` exceeds ``records_per_site`` (the attack compares as many
            members as non-members).
    """
    if not 0 < held_out <= federation.records_per_site:
        raise ValueError(
            f"held_out must be between 1 and records_per_site ({federation.records_per_site}), "
            f"got {held_out}"
        )
    task = build_icd10_task(
        num_sites=federation.num_sites,
        partition="by-chapter",
        alpha=1.0,
        examples_per_site=federation.records_per_site + held_out,
        gold_size=federation.gold_size,
        seed=federation.seed,
        chapters=federation.chapters,
    )
    sites = write_attack_sites(
        task, experiment, work, records_per_site=federation.records_per_site, held_out=held_out
    )
    return _files_config(
        federation, recipe, epsilon, sites, work / "gold.jsonl", task.system_prompt
    )


# A recipe small enough to check a benchmark end to end in seconds (one short round).
SMOKE_RECIPE = DpRecipe(
    expected_batch_size=4,
    local_epochs=0.5,
    rounds=1,
    learning_rate=1e-2,
    lora_rank=8,
    lr_schedule="constant",
    warmup_rounds=0,
    server_momentum=0.0,
    eval_every_rounds=1,
)


def smoke_setup(work: Path) -> tuple[Federation, DpRecipe]:
    """A federation and recipe small enough to check a benchmark end to end in seconds.

    The tiny random-init Llama (written to ``work``), 2 sites of 12 records, one round.
    """
    model = write_tiny_llama(work / "tiny-llama", seed=0)
    federation = Federation(model=str(model), num_sites=2, records_per_site=12, gold_size=6)
    return federation, SMOKE_RECIPE


def run_federation(config: FedsiloConfig, run_dir: Path, *, resume: bool) -> list[dict[str, Any]]:
    """Simulate ``config`` in ``run_dir`` (continuing its rounds with ``resume``); its metrics.

    Without ``resume``, or when ``run_dir`` holds no resumable run, the folder is cleared and
    the run starts afresh.
    """
    resumable = resume and RunFolder(run_dir).ledger_path.is_file()
    if not resumable:
        shutil.rmtree(run_dir, ignore_errors=True)
    request = SimulationRequest(
        config=config, run_dir=run_dir, resume=resumable, reporter=LogReporter()
    )
    simulate(request)
    return RunFolder(run_dir).read_metrics()


class ResultsFileConflictError(ValueError):
    """A results file holds another federation's or recipe's results: it is not overwritten."""


def stored_results(out: Path, header: dict[str, Any]) -> dict[str, Any] | None:
    """The results file ``out`` if it was written for ``header``; None if there is none.

    Raises:
        ResultsFileConflictError: the file holds results measured with another header (another
            federation, recipe or settings), which a new measurement must not replace.
    """
    if not out.is_file():
        return None
    stored: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    differing = {key: (stored.get(key), value) for key, value in header.items()}
    differing = {key: pair for key, pair in differing.items() if pair[0] != pair[1]}
    if differing:
        shown = "; ".join(
            f"{key}: {there!r} there, {here!r} here" for key, (there, here) in differing.items()
        )
        raise ResultsFileConflictError(
            f"{out} holds results measured with other settings ({shown}); it is kept as it "
            "is: pass another --out, or remove the file to measure afresh"
        )
    return stored


def merge_results(
    out: Path,
    header: dict[str, Any],
    build: Callable[[dict[str, Any] | None], dict[str, Any]],
) -> dict[str, Any]:
    """Rewrite the results file ``out`` as ``header`` plus ``build(previous)``; what was written.

    ``previous`` is the file's content (None when there is no file), so ``build`` can keep
    what other processes measured. Several processes may measure into one file: it is re-read
    and rewritten (atomically) under a lock on its folder, so no process drops another's
    results.

    Raises:
        ResultsFileConflictError: ``out`` holds results of another header (:func:`stored_results`).
    """
    with folder_lock(out.parent):
        result = {**header, **build(stored_results(out, header))}
        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
        return result


def save_row(
    out: Path,
    header: dict[str, Any],
    row: dict[str, Any],
    *,
    rows_key: str,
    same: Callable[[dict[str, Any], dict[str, Any]], bool],
    summary: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Add ``row`` to the results file ``out`` (replacing a row ``same`` as it); all its rows.

    ``summary`` adds fields computed from all the rows (for instance the best one). Rows other
    processes wrote for the same ``header`` are kept; a file written for another header is
    refused, not overwritten (:func:`merge_results`).
    """
    rows: list[dict[str, Any]] = []

    def with_row(previous: dict[str, Any] | None) -> dict[str, Any]:
        rows[:] = [old for old in (previous or {}).get(rows_key, []) if not same(old, row)]
        rows.append(row)
        return {
            rows_key: rows,
            **(summary(rows) if summary else {}),
            "threads": 1,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        }

    merge_results(out, header, with_row)
    return rows
