"""Federated against centralized and local-only training, at one budget, on one task.

``run_quality_benchmark`` trains the same LoRA adapter on the same examples in every way the
issue asks for, and scores each on the task's gold set after every round:

- ``centralized``: all sites' examples pooled in one place; ``rounds`` rounds of as many
  steps as all sites together take in a round (``num_sites * local_steps``, or the sum of the
  sites' steps when local work is set in epochs), so it sees exactly the examples and takes
  exactly the optimizer steps that the whole federation does.
- ``local``: every site alone, ``rounds`` rounds of the steps it takes in the federation, on
  its own examples; scored after the last round only, to save compute, and reported as the
  mean and the worst site.
- ``fedavg``, ``fedprox-mu<mu>`` (one per mu of the grid), ``fedadam``, ``ffa-lora`` (FedAvg
  with A frozen): the real federation (ServerApp, ClientApp, signatures, ledger) simulated
  in-process, each in its own run folder.

Centralized and local-only use the same training loop the sites use (``train_plain``), the
same per-round learning rate (``round_learning_rate``, as the server sends it) and the same
gold evaluation as the server. Every configuration starts from the same seeded
adapter. The ICD-10 tasks also score each final adapter on the edge-case sets.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import resource
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsilo.bench.local_progress import (
    LocalSiteResult,
    has_local_progress,
    load_local_progress,
    save_local_progress,
)
from fedsilo.bench.pooled_checkpoint import (
    PooledCheckpoint,
    has_pooled_checkpoint,
    load_pooled_checkpoint,
    save_pooled_checkpoint,
)
from fedsilo.bench.settings import (
    ALL_ALGORITHMS,
    LENGTHS,
    METRIC_MEANING,
    TASK_PRESETS,
    QualityBudget,
)
from fedsilo.client.site import LoadedModel, load_model_with_adapter
from fedsilo.config import FedsiloConfig, parse_config
from fedsilo.config.schema import DeviceSetting
from fedsilo.data.encode import Example, encode_records
from fedsilo.data.icd10 import TaskData, default_chapters
from fedsilo.data.icd10_edge import EdgeCaseSet, build_icd10_edge_cases
from fedsilo.data.tasks import build_task
from fedsilo.evaluation.edge_cases import evaluate_edge_cases
from fedsilo.evaluation.gold import evaluate_task_gold
from fedsilo.evaluation.metrics import GoldMetrics
from fedsilo.model.adapters import AdapterState, set_adapter_state
from fedsilo.protocol.schedule import local_steps_for, round_learning_rate
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.engines import SimulationRequest, simulate
from fedsilo.storage import write_text_atomic
from fedsilo.training.device import GPU_EVAL_BATCH
from fedsilo.training.loop import train_plain
from fedsilo.training.precision import cpu_model, forward_in

log = logging.getLogger(__name__)


@dataclass
class QualityRequest:
    """What to benchmark, with what, and where to write."""

    task: str
    model: str
    out_dir: Path
    results_path: Path
    budget: QualityBudget = field(default_factory=QualityBudget)
    algorithms: tuple[str, ...] = ALL_ALGORITHMS
    edge_cases: bool = True
    resume: bool = False  # keep the algorithms results_path already holds, run the rest
    say: Callable[[str], None] = print
    # How the budget's learning rates and mu were chosen (a sweep's grid and choice), if so.
    hyperparameters: Mapping[str, Any] | None = None
    # Where every algorithm trains and is scored (train.device). Not part of the budget: the
    # same budget measures the same thing on either device (a GPU is not bit-reproducible).
    device: DeviceSetting = "cpu"
    # The command line that asked for this run, kept in the results so they can be re-run.
    command: str | None = None


class _QuietReporter:
    """Progress of one simulated federation, one line per round."""

    def __init__(self, label: str, say: Callable[[str], None]) -> None:
        self.label, self.say = label, say

    def round_done(self, record: dict[str, Any], *, total_rounds: int) -> None:
        gold = (
            f" gold {record['gold_accuracy']:.3f} / {record['gold_category_accuracy']:.3f} "
            f"loss {record['gold_loss']:.3f}"
            if "gold_accuracy" in record
            else ""  # not scored after this round
        )
        self.say(
            f"{self.label}: round {record['round']}/{total_rounds}{gold} "
            f"({record['seconds']:.0f} s)"
        )

    def notice(self, text: str) -> None:
        self.say(f"{self.label}: {text}")


def _gold_row(metrics: GoldMetrics) -> dict[str, Any]:
    interval = metrics.category_accuracy_ci95
    return {
        "gold_accuracy": metrics.accuracy,
        "gold_category_accuracy": metrics.category_accuracy,
        "gold_loss": metrics.loss,
        "gold_count": metrics.count,
        "gold_category_accuracy_ci95": None if interval is None else list(interval),
        "gold_parts": {name: dict(figures) for name, figures in metrics.parts.items()},
    }


def base_config(request: QualityRequest) -> FedsiloConfig:
    """The federation every algorithm is derived from (FedAvg, plain LoRA)."""
    if request.task not in TASK_PRESETS:
        raise ValueError(f"unknown task {request.task!r}; choose one of {sorted(TASK_PRESETS)}")
    budget = request.budget
    task = dict(TASK_PRESETS[request.task])
    length, new_tokens = LENGTHS[task["name"]]
    task.update(
        num_sites=budget.num_sites,
        examples_per_site=budget.examples_per_site,
        gold_size=budget.gold_size,
        validation_share=budget.validation_share,
    )
    if task["name"] == "icd10":
        task.update(
            gold_phrasings=budget.gold_phrasings,
            gold_ranking_candidates=budget.gold_ranking_candidates,
            train_on_inclusion_terms=budget.train_on_inclusion_terms,
        )
    local_work = (
        {"local_epochs": budget.local_epochs}
        if budget.local_epochs is not None
        else {"local_steps": budget.local_steps}
    )
    return parse_config(
        {
            "run": {
                "name": f"quality-{request.task}",
                "seed": budget.seed,
                "rounds": budget.rounds,
                "require_site_policies": False,
            },
            "model": {"base": request.model},
            "lora": {"rank": budget.lora_rank, "alpha": 2.0 * budget.lora_rank},
            "task": task,
            "train": {
                **local_work,
                "batch_size": budget.batch_size,
                "learning_rate": budget.learning_rate,
                "lr_schedule": budget.lr_schedule,
                "warmup_rounds": budget.warmup_rounds,
                "max_length": budget.max_length or length,
                "device": request.device,
            },
            "strategy": {
                "name": "fedavg",
                "min_sites": budget.num_sites,
                "server_learning_rate": budget.server_learning_rate,
                "server_momentum": budget.server_momentum,
            },
            "evaluation": {
                "max_new_tokens": budget.max_new_tokens or new_tokens,
                "every_rounds": budget.gold_every_rounds,
                # A GPU scores the whole gold set in a few large batches; CPU: the default.
                **({"batch_size": GPU_EVAL_BATCH} if request.device == "cuda" else {}),
            },
        },
        source=f"quality benchmark {request.task}",
    )


def federated_configs(config: FedsiloConfig, budget: QualityBudget) -> dict[str, FedsiloConfig]:
    """One config per federated algorithm: the FedProx grid expands to one run per mu."""

    def variant(
        name: str, strategy: dict[str, Any], lora: dict[str, Any] | None = None
    ) -> FedsiloConfig:
        return config.model_copy(
            update={
                "strategy": config.strategy.model_copy(update=strategy),
                "lora": config.lora.model_copy(update=lora or {}),
                "train": config.train.model_copy(
                    update={"learning_rate": budget.learning_rate_for(name)}
                ),
            }
        )

    configs = {"fedavg": variant("fedavg", {"name": "fedavg"})}
    for mu in budget.proximal_mus:
        configs[f"fedprox-mu{mu:g}"] = variant("fedprox", {"name": "fedprox", "proximal_mu": mu})
    configs["fedadam"] = variant(
        "fedadam",
        {
            "name": "fedadam",
            "server_momentum": 0.0,
            "server_learning_rate": budget.server_learning_rate,
        },
    )
    configs["ffa-lora"] = variant("ffa-lora", {"name": "fedavg"}, {"ffa": True})
    return configs


def site_steps(config: FedsiloConfig, num_examples: int) -> int:
    """Optimizer steps a site with ``num_examples`` examples takes in one round (as the site
    itself computes them from the round task)."""
    train = config.train
    return local_steps_for(
        local_steps=train.local_steps or 0,
        local_epochs=train.local_epochs or 0.0,
        batch_size=train.batch_size,
        num_examples=num_examples,
    )


def learning_rate_of_round(config: FedsiloConfig, round_number: int) -> float:
    """Round ``round_number``'s learning rate: the one the server sends the sites."""
    train = config.train
    return round_learning_rate(
        train.learning_rate,
        round_number=round_number,
        rounds=config.run.rounds,
        schedule=train.lr_schedule,
        warmup_rounds=train.warmup_rounds,
    )


def _round_seed(seed: int, round_number: int, site: int) -> int:
    return int(np.random.SeedSequence([seed, round_number, site, 0xBE]).generate_state(1)[0])


class _Trainer:
    """Centralized and local-only training with the sites' loop, evaluated like the server."""

    def __init__(self, config: FedsiloConfig, task: TaskData) -> None:
        self.config = config
        self.task = task
        self.loaded: LoadedModel = load_model_with_adapter(config)
        tokenizer = self.loaded.tokenizer
        self.examples = [
            encode_records(
                tokenizer,
                site.records,
                system_prompt=task.system_prompt,
                max_length=config.train.max_length,
                source=f"site {site.name}",
            )
            for site in task.sites
        ]

    def evaluate(self, adapter: AdapterState) -> GoldMetrics:
        return self._score(adapter, self.task)

    def evaluate_validation(self, adapter: AdapterState) -> dict[str, float]:
        """The adapter on the sites' held-out validation records (never on a gold set)."""
        if not self.task.validation:
            raise ValueError("no validation split: set validation_share above 0")
        held_out = dataclasses.replace(
            self.task, gold=self.task.validation, phrasings=(), ranking=()
        )
        metrics = self._score(adapter, held_out)
        return {
            "validation_loss": metrics.loss,
            "validation_accuracy": metrics.accuracy,
            "validation_category_accuracy": metrics.category_accuracy,
            "validation_count": metrics.count,
        }

    def _score(self, adapter: AdapterState, task: TaskData) -> GoldMetrics:
        set_adapter_state(self.loaded.model, adapter)
        with forward_in(self.loaded.model, self.loaded.precision.precision):
            return evaluate_task_gold(
                self.loaded.model,
                self.loaded.tokenizer,
                task,
                max_new_tokens=self.config.evaluation.max_new_tokens,
                batch_size=self.config.evaluation.batch_size,
                max_length=self.config.train.max_length,
            )

    def train_round(
        self,
        state: AdapterState,
        examples: Sequence[Example],
        *,
        steps: int,
        learning_rate: float,
        seed: int,
    ) -> AdapterState:
        train = self.config.train
        result = train_plain(
            self.loaded.model,
            examples,
            global_state=state,
            steps=steps,
            batch_size=train.batch_size,
            learning_rate=learning_rate,
            proximal_mu=0.0,
            max_grad_norm=train.max_grad_norm,
            pad_id=int(self.loaded.tokenizer.pad_token_id),
            seed=seed,
        )
        return {name: state[name] + result.delta[name] for name in state}


def _with_learning_rate(config: FedsiloConfig, learning_rate: float) -> FedsiloConfig:
    return config.model_copy(
        update={"train": config.train.model_copy(update={"learning_rate": learning_rate})}
    )


def _centralized_states(
    trainer: _Trainer, *, learning_rate: float, after: PooledCheckpoint | None = None
) -> Iterator[tuple[int, float, int, AdapterState]]:
    """Round by round: (round, its learning rate, steps per round, the adapter after it),
    from the round after ``after`` (a checkpoint) or from the first."""
    config = _with_learning_rate(trainer.config, learning_rate)
    pooled = [example for site in trainer.examples for example in site]
    # The optimizer steps all sites together take in a round.
    steps = sum(site_steps(config, len(site)) for site in trainer.examples)
    state = trainer.loaded.adapter_template if after is None else after.adapter
    first = 1 if after is None else after.round + 1
    for round_number in range(first, config.run.rounds + 1):
        rate = learning_rate_of_round(config, round_number)
        state = trainer.train_round(
            state,
            pooled,
            steps=steps,
            learning_rate=rate,
            seed=_round_seed(config.run.seed, round_number, 0),
        )
        yield round_number, rate, steps, state


def _centralized(
    trainer: _Trainer,
    say: Callable[[str], None],
    *,
    learning_rate: float,
    out_dir: Path,
    identity: dict[str, Any],
    resume: bool,
) -> tuple[dict[str, Any], AdapterState]:
    """The pooled baseline, checkpointed after every round under ``out_dir``; with
    ``resume``, a checkpoint of the same benchmark is continued from the round after it."""
    config = trainer.config
    if has_pooled_checkpoint(out_dir) and not resume:
        raise FileExistsError(
            f"{out_dir} already holds a centralized checkpoint: choose another --out or --resume"
        )
    after = load_pooled_checkpoint(out_dir, identity) if resume else None
    rows = [] if after is None else list(after.rows)
    spent = 0.0 if after is None else after.seconds
    if after is not None:
        say(f"centralized: resuming after round {after.round} of {config.run.rounds}")
    state = trainer.loaded.adapter_template if after is None else after.adapter
    steps = sum(site_steps(config, len(site)) for site in trainer.examples)
    started = begun = time.perf_counter()
    for round_number, rate, _, state in _centralized_states(
        trainer, learning_rate=learning_rate, after=after
    ):
        if config.scores_gold_after(round_number):
            # A learning-curve point (the federated runs score the same rounds).
            row = {"round": round_number, "learning_rate": rate}
            row.update(_gold_row(trainer.evaluate(state)))
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            say(
                f"centralized: round {round_number} gold {row['gold_accuracy']:.3f} / "
                f"{row['gold_category_accuracy']:.3f} loss {row['gold_loss']:.3f}"
            )
            started = time.perf_counter()
        seconds = spent + time.perf_counter() - begun
        save_pooled_checkpoint(
            out_dir, identity, PooledCheckpoint(round_number, rows, seconds, state)
        )
    record_bytes = [
        sum(len(json.dumps(asdict(r)).encode()) for r in site.records)
        for site in trainer.task.sites
    ]
    result = {
        "per_round": rows,
        "learning_rate": learning_rate,
        "optimizer_steps": steps * config.run.rounds,
        "examples_seen": steps * config.run.rounds * config.train.batch_size,
        "bytes_up_per_site": 0,
        "raw_record_bytes_moved_per_site": max(record_bytes),
        "wall_seconds": spent + time.perf_counter() - begun,
    }
    if after is not None:
        # The first row scored after the resume counts only this process's part of its time.
        result["resumed_after_round"] = after.round
    return result, state


def _local_states(
    trainer: _Trainer, *, learning_rate: float, skip: Collection[str] = ()
) -> Iterator[tuple[str, AdapterState, int]]:
    """Each site (but those in ``skip``) trained alone for the rounds and steps it spends in
    the federation."""
    config = _with_learning_rate(trainer.config, learning_rate)
    for index, (site, examples) in enumerate(
        zip(trainer.task.sites, trainer.examples, strict=True)
    ):
        if site.name in skip:
            continue
        state = trainer.loaded.adapter_template
        steps = site_steps(config, len(examples))
        for round_number in range(1, config.run.rounds + 1):
            state = trainer.train_round(
                state,
                examples,
                steps=steps,
                learning_rate=learning_rate_of_round(config, round_number),
                seed=_round_seed(config.run.seed, round_number, index + 1),
            )
        yield site.name, state, steps * config.run.rounds


def _local(
    trainer: _Trainer,
    say: Callable[[str], None],
    *,
    learning_rate: float,
    out_dir: Path,
    identity: dict[str, Any],
    resume: bool,
) -> dict[str, Any]:
    """Every site trained alone and scored; each finished site is recorded under ``out_dir``,
    and with ``resume`` the sites recorded there by a run of the same benchmark are kept."""
    if has_local_progress(out_dir) and not resume:
        raise FileExistsError(
            f"{out_dir} already holds local-only progress: choose another --out or --resume"
        )
    finished = load_local_progress(out_dir, identity) if resume else {}
    if finished:
        say(f"local: resuming with {len(finished)} site(s) done: {', '.join(sorted(finished))}")
    for name, state, steps in _local_states(trainer, learning_rate=learning_rate, skip=finished):
        finished[name] = LocalSiteResult(_gold_row(trainer.evaluate(state)), steps)
        save_local_progress(out_dir, identity, finished)
        say(
            f"local {name}: gold {finished[name].gold['gold_accuracy']:.3f} / "
            f"{finished[name].gold['gold_category_accuracy']:.3f}"
        )
    order = [site.name for site in trainer.task.sites]
    per_site = {name: finished[name].gold for name in order}
    steps_per_site = {name: finished[name].steps for name in order}
    keys = ("gold_accuracy", "gold_category_accuracy")
    mean = {k: float(np.mean([row[k] for row in per_site.values()])) for k in (*keys, "gold_loss")}
    worst = {k: min(row[k] for row in per_site.values()) for k in keys}
    worst["gold_loss"] = max(row["gold_loss"] for row in per_site.values())
    return {
        "per_site": per_site,
        "final_mean": mean,
        "final_worst": worst,
        "learning_rate": learning_rate,
        "optimizer_steps_per_site": _one_or_all(steps_per_site),
        "bytes_up_per_site": 0,
    }


def _one_or_all(per_site: dict[str, int]) -> int | dict[str, int]:
    """One number when every site has the same, else the number per site."""
    values = set(per_site.values())
    return values.pop() if len(values) == 1 else per_site


def _federated(
    name: str,
    config: FedsiloConfig,
    run_dir: Path,
    say: Callable[[str], None],
    *,
    resume: bool,
    site_sizes: Mapping[str, int],
) -> tuple[dict[str, Any], AdapterState]:
    """One simulated federation; with ``resume``, a run folder left by a stopped run goes on."""
    started = run_dir.exists() and any(run_dir.iterdir())
    if started and not resume:
        raise FileExistsError(f"{run_dir} already holds a run: choose another --out or --resume")
    begun = time.perf_counter()
    simulate(
        SimulationRequest(
            config=config, run_dir=run_dir, resume=started, reporter=_QuietReporter(name, say)
        )
    )
    folder = RunFolder(run_dir)
    metrics = folder.read_metrics()
    keys = ("gold_accuracy", "gold_category_accuracy", "gold_loss", "seconds", "train_loss")
    extra = ("gold_count", "gold_category_accuracy_ci95", "gold_parts")
    rows = [
        {
            "round": m["round"],
            "learning_rate": learning_rate_of_round(config, m["round"]),
            **{k: m[k] for k in keys},
            **{k: m[k] for k in extra if k in m},
        }
        for m in metrics
        if m["round"] > 0 and "gold_accuracy" in m  # rounds after which gold was scored
    ]
    steps = {site: site_steps(config, size) for site, size in site_sizes.items()}
    result = {
        "per_round": rows,
        "learning_rate": config.train.learning_rate,
        "round0": {
            k: metrics[0][k] for k in ("gold_accuracy", "gold_category_accuracy", "gold_loss")
        },
        "bytes_up_per_site_per_round": metrics[-1]["bytes_up_per_site"],
        "bytes_up_per_site": sum(m["bytes_up_per_site"] for m in metrics),
        "bytes_down_per_site": sum(m["bytes_down_per_site"] for m in metrics),
        "optimizer_steps_per_site": _one_or_all(
            {site: config.run.rounds * n for site, n in steps.items()}
        ),
        "examples_seen": config.run.rounds * sum(steps.values()) * config.train.batch_size,
        "run_dir": str(run_dir),
        "wall_seconds": time.perf_counter() - begun,
    }
    return result, folder.load_checkpoint(config.run.rounds).adapter


def _final(result: dict[str, Any]) -> dict[str, float]:
    if "final_mean" in result:
        return dict(result["final_mean"])
    last = result["per_round"][-1]
    return {k: last[k] for k in ("gold_accuracy", "gold_category_accuracy", "gold_loss")}


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 else None


def summarize_goals(
    algorithms: dict[str, dict[str, Any]], round0: dict[str, float]
) -> dict[str, Any]:
    """Where each federated algorithm stands against centralized and local-only.

    Accuracy ratios are None when centralized scored 0. ``gold_loss_reduction_vs_centralized``
    is the share of centralized training's gold-loss reduction (from the untrained adapter)
    that the algorithm achieved: informative even when every accuracy is 0.
    """
    summary: dict[str, Any] = {}
    central = _final(algorithms["centralized"]) if "centralized" in algorithms else None
    local = algorithms.get("local", {}).get("final_mean")
    for name, result in algorithms.items():
        if name in ("centralized", "local"):
            continue
        final = _final(result)
        row: dict[str, Any] = {}
        for key in ("gold_accuracy", "gold_category_accuracy"):
            if central is not None:
                row[f"{key}_vs_centralized"] = _ratio(final[key], central[key])
            if local is not None:
                row[f"{key}_minus_local_mean"] = final[key] - local[key]
        if central is not None:
            row["gold_loss_reduction_vs_centralized"] = _ratio(
                round0["gold_loss"] - final["gold_loss"], round0["gold_loss"] - central["gold_loss"]
            )
        if local is not None:
            row["gold_loss_minus_local_mean"] = final["gold_loss"] - local["gold_loss"]
        summary[name] = row
    return summary


class ResumeError(ValueError):
    """A results file that a resumed benchmark cannot build on; says which field differs."""


# The fields of a results file that say what was measured (``_identity``): a resumed run adds
# only to a file that matches them all, and so does ``fedsilo bench merge``.
IDENTITY_FIELDS = ("task", "model", "base_model_hash", "budget", "train", "lora")


def _identity(
    request: QualityRequest, config: FedsiloConfig, base_model_hash: str
) -> dict[str, Any]:
    """What a results file must match for a resumed run to add to it."""
    values = (
        request.task,
        request.model,
        base_model_hash,
        json.loads(json.dumps(asdict(request.budget))),
        # The device and compilation are recorded apart (``machine``): a run may resume on
        # another device, or compiled where it started eager (the same training, rounded
        # differently in bf16).
        config.train.model_dump(mode="json", exclude={"device", "compile"}),
        config.lora.model_dump(mode="json"),
    )
    return dict(zip(IDENTITY_FIELDS, values, strict=True))


def _previous(request: QualityRequest, identity: dict[str, Any]) -> dict[str, Any]:
    """The results already measured with the same identity (empty when not resuming)."""
    path = request.results_path
    if not request.resume or not path.exists():
        return {}
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ResumeError(f"{path}: not a results file ({error})") from error
    for key, value in identity.items():
        if data.get(key) != value:
            raise ResumeError(
                f"{path}: field {key!r} differs from this run ({data.get(key)!r} there, "
                f"{value!r} here); resume with the same settings or write another --results"
            )
    return data


def _edge_scores(
    trainer: _Trainer,
    cases: Mapping[str, EdgeCaseSet],
    adapter: AdapterState,
    name: str,
    say: Callable[[str], None],
) -> dict[str, Any]:
    set_adapter_state(trainer.loaded.model, adapter)
    config = trainer.config
    scores = evaluate_edge_cases(
        trainer.loaded.model,
        trainer.loaded.tokenizer,
        cases,
        system_prompt=trainer.task.system_prompt,
        max_new_tokens=config.evaluation.max_new_tokens,
        batch_size=config.evaluation.batch_size,
        max_length=config.train.max_length,
    )
    say(
        f"edge cases {name}: "
        + ", ".join(
            f"{k} {s.accuracy if s.accuracy is not None else s.code_shaped_rate:.2f}"
            for k, s in scores.items()
        )
    )
    return {kind: asdict(score) for kind, score in scores.items()}


def _device_name(device: DeviceSetting) -> str:
    """What the results file says the benchmark computed on."""
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return device


def run_quality_benchmark(request: QualityRequest) -> dict[str, Any]:
    """Run every requested algorithm; write and return the results.

    The results file is rewritten (atomically) after every algorithm, with ``complete``
    false until the last: a run that stops keeps what it measured, and ``request.resume``
    picks it up, skipping the algorithms it holds and resuming a federation that stopped
    midway from its last checkpoint.
    """
    unknown = [a for a in request.algorithms if a not in ALL_ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {unknown}; choose from {list(ALL_ALGORITHMS)}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    config = base_config(request)
    task = build_task(config.task, seed=config.run.seed)
    request.out_dir.mkdir(parents=True, exist_ok=True)
    say = request.say
    say(
        f"quality {request.task}: {len(task.sites)} sites {[s.name for s in task.sites]}, "
        f"gold {len(task.gold)}, metric {task.metric}, model {request.model}"
    )

    trainer = _Trainer(config, task)
    identity = _identity(request, config, trainer.loaded.base_model_hash)
    previous = _previous(request, identity)
    initial = trainer.loaded.adapter_template
    round0 = _gold_row(trainer.evaluate(initial))
    say(
        f"before training: gold {round0['gold_accuracy']:.3f} / "
        f"{round0['gold_category_accuracy']:.3f} loss {round0['gold_loss']:.3f}"
    )
    algorithms: dict[str, dict[str, Any]] = dict(previous.get("algorithms", {}))
    edge: dict[str, Any] = dict(previous.get("edge_cases", {}))
    if algorithms:
        say(f"resuming: keeping {sorted(algorithms)} from {request.results_path}")
    cases: dict[str, EdgeCaseSet] = {}
    if request.edge_cases and task.name == "icd10":
        chapters = config.task.chapters or default_chapters(config.task.num_sites)
        cases = build_icd10_edge_cases(
            task,
            chapters=chapters,
            per_kind=request.budget.edge_cases_per_kind,
            seed=config.run.seed,
        )
        edge["sizes"] = {kind: len(case_set.records) for kind, case_set in cases.items()}
    earlier_seconds = float(previous.get("wall_seconds", 0.0))

    def write(*, complete: bool) -> dict[str, Any]:
        result = {
            "benchmark": "quality",
            **identity,
            "task_settings": config.task.model_dump(mode="json", exclude_none=True),
            "metric": task.metric,
            "metric_meaning": METRIC_MEANING[task.metric],
            "sites": {site.name: len(site.records) for site in task.sites},
            "validation_count": len(task.validation),
            "gold_count": len(task.gold),
            "round0": round0,
            "algorithms": algorithms,
            "goals": summarize_goals(algorithms, round0),
            "edge_cases": edge,
            "hyperparameters": dict(request.hyperparameters or {"chosen_by": "given"}),
            "complete": complete,
            "out_dir": str(request.out_dir),
            "wall_seconds": earlier_seconds + time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "machine": {
                "device": _device_name(request.device),
                "cpus": os.cpu_count(),
                "cpu_model": cpu_model(),
                "platform": platform.platform(),
                "torch_threads": 1,
                # How this process trained (a resumed run may have started in another).
                "precision": trainer.loaded.precision.precision,
                "compiled_plain_training": trainer.loaded.compiled.enabled,
            },
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if request.command is not None:
            result["command"] = request.command
        if "merged_from" in previous:  # parts other processes measured (fedsilo bench merge)
            result["merged_from"] = previous["merged_from"]
        write_text_atomic(request.results_path, json.dumps(result, indent=2) + "\n")
        return result

    def done(name: str, result: dict[str, Any], adapter: AdapterState | None) -> None:
        algorithms[name] = result
        if cases and adapter is not None:
            edge[name] = _edge_scores(trainer, cases, adapter, name, say)
        write(complete=False)

    budget = request.budget
    if "centralized" in request.algorithms and "centralized" not in algorithms:
        rate = budget.learning_rate_for("centralized")
        done(
            "centralized",
            *_centralized(
                trainer,
                say,
                learning_rate=rate,
                out_dir=request.out_dir,
                identity=identity,
                resume=request.resume,
            ),
        )
    if "local" in request.algorithms and "local" not in algorithms:
        rate = budget.learning_rate_for("local")
        local = _local(
            trainer,
            say,
            learning_rate=rate,
            out_dir=request.out_dir,
            identity=identity,
            resume=request.resume,
        )
        done("local", local, None)
    sizes = {
        site.name: len(examples)
        for site, examples in zip(task.sites, trainer.examples, strict=True)
    }
    for name, variant in federated_configs(config, request.budget).items():
        family = "fedprox" if name.startswith("fedprox") else name
        if family not in request.algorithms or name in algorithms:
            continue
        result, adapter = _federated(
            name, variant, request.out_dir / name, say, resume=request.resume, site_sizes=sizes
        )
        # FFA-LoRA's state holds B only; A is the shared seeded init the template holds.
        done(name, result, {**initial, **adapter})

    result = write(complete=True)
    say(f"wrote {request.results_path}")
    return result
