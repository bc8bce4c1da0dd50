"""Choose the quality benchmark's learning rates, FedProx mu and FedAdam's server rate.

Hyperparameters are never chosen on a gold set. The sweep holds out ``validation_share`` of
each site's own records (``fedsilo.data.tasks.hold_out_validation``: deterministic by seed,
never trained on, disjoint from the gold sets), trains every requested algorithm at every
learning rate of the grid with the benchmark's budget on the first seed, and scores each
final adapter on the validation records only. Per algorithm the rate with the lowest
validation loss wins (ties: the higher validation accuracy, then the smaller rate); FedProx
then tries each mu of its grid at FedAvg's chosen rate and keeps the mu with the lowest
validation loss, and FedAdam, given a grid of server learning rates, tries each at FedAvg's
chosen rate the same way (its server step, not the sites' rate, is what FedAdam adds).
Local-only is scored as the mean over sites of each site's adapter on the pooled validation
records. The grid, every point and the choice go into the sweep's results
file, and into each benchmark results file measured with the choice (``hyperparameters``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsilo.bench.quality import (
    QualityRequest,
    ResumeError,
    _centralized_states,
    _federated,
    _identity,
    _local_states,
    _Trainer,
    base_config,
    federated_configs,
)
from fedsilo.bench.settings import FEDERATED, QualityBudget
from fedsilo.data.tasks import build_task
from fedsilo.model.adapters import AdapterState
from fedsilo.storage import write_text_atomic

SELECTION = (
    "lowest validation loss of the final adapter on the sites' held-out validation records "
    "(ties: higher validation accuracy, then the smaller value); FedProx's mu and FedAdam's "
    "server learning rate at FedAvg's chosen learning rate"
)


# Grids a resumed sweep may widen (a choice at a grid's edge calls for the next value out).
GRID_FIELDS = ("learning_rate_grid", "mu_grid", "server_lr_grid")


@dataclass(frozen=True)
class SweepRequest:
    """The grid to try, with the benchmark request whose budget it tunes."""

    quality: QualityRequest  # results_path: where the sweep's own results go
    learning_rates: tuple[float, ...]
    proximal_mus: tuple[float, ...]
    # FedAdam's server learning rates; empty: FedAdam's client rate is swept like the others'
    # at the budget's server rate.
    server_learning_rates: tuple[float, ...] = ()


def _best(points: Mapping[str, Mapping[str, float]]) -> str:
    """The key of the point with the lowest validation loss (ties as SELECTION says)."""
    return min(
        points,
        key=lambda k: (
            points[k]["validation_loss"],
            -points[k]["validation_accuracy"],
            float(k),
        ),
    )


def chosen_budget(budget: QualityBudget, sweep: Mapping[str, Any]) -> QualityBudget:
    """``budget`` with a finished sweep's learning rates and mu."""
    if not sweep.get("complete"):
        raise ValueError("the sweep has not finished: run it again with --resume")
    chosen = sweep["chosen"]
    mu = chosen.get("proximal_mu")
    server = chosen.get("server_learning_rate")
    return dataclasses.replace(
        budget,
        learning_rates=tuple(sorted((k, float(v)) for k, v in chosen["learning_rates"].items())),
        proximal_mus=budget.proximal_mus if mu is None else (float(mu),),
        server_learning_rate=budget.server_learning_rate if server is None else float(server),
    )


def hyperparameters_record(sweep: Mapping[str, Any], sweep_path: Path) -> dict[str, Any]:
    """What a benchmark results file says about how its hyperparameters were chosen."""
    return {
        "chosen_by": "validation sweep",
        "sweep_file": str(sweep_path),
        "selection": sweep["selection"],
        "learning_rate_grid": sweep["learning_rate_grid"],
        "mu_grid": sweep["mu_grid"],
        "server_lr_grid": sweep.get("server_lr_grid", []),
        "chosen": sweep["chosen"],
        "validation_count": sweep["validation_count"],
    }


def run_sweep(request: SweepRequest) -> dict[str, Any]:
    """Try every grid point (keeping those a resumed results file holds); write the choice."""
    quality = request.quality
    if quality.budget.validation_share <= 0:
        raise ValueError("the sweep needs a validation split: set --validation-share above 0")
    if not request.learning_rates:
        raise ValueError("the sweep needs at least one learning rate (--lr-grid)")
    torch.set_num_threads(1)
    say = quality.say
    config = base_config(quality)
    task = build_task(config.task, seed=config.run.seed)
    trainer = _Trainer(config, task)
    identity = _identity(quality, config, trainer.loaded.base_model_hash)
    identity["learning_rate_grid"] = list(request.learning_rates)
    identity["mu_grid"] = list(request.proximal_mus)
    if request.server_learning_rates:  # absent otherwise, so older sweep files still resume
        identity["server_lr_grid"] = list(request.server_learning_rates)
    path = quality.results_path
    previous: dict[str, Any] = {}
    if quality.resume and path.exists():
        previous = json.loads(path.read_text())
        for key, value in identity.items():
            stored = previous.get(key)
            if key in GRID_FIELDS and isinstance(stored, list) and set(stored) <= set(value):
                continue  # a widened grid: the points measured are kept, the new ones added
            if stored != value:
                raise ResumeError(
                    f"{path}: field {key!r} differs from this sweep ({stored!r} there, "
                    f"{value!r} here); resume with the same settings (a grid may only grow)"
                )
    points: dict[str, dict[str, dict[str, float]]] = previous.get("points", {})
    mu_points: dict[str, dict[str, float]] = previous.get("fedprox_points", {})
    server_points: dict[str, dict[str, float]] = previous.get("fedadam_server_points", {})
    started = time.perf_counter()
    initial = trainer.loaded.adapter_template
    sizes = {s.name: len(e) for s, e in zip(task.sites, trainer.examples, strict=True)}
    say(
        f"sweep {quality.task}: {len(task.validation)} validation records, learning rates "
        f"{list(request.learning_rates)}, mu {list(request.proximal_mus)}"
    )

    def write(chosen: dict[str, Any], *, complete: bool) -> dict[str, Any]:
        result = {
            "benchmark": "quality-sweep",
            **identity,
            "selection": SELECTION,
            "validation_share": quality.budget.validation_share,
            "validation_count": len(task.validation),
            "points": points,
            "fedprox_points": mu_points,
            "fedadam_server_points": server_points,
            "chosen": chosen,
            "complete": complete,
            "out_dir": str(quality.out_dir),
            "wall_seconds": float(previous.get("wall_seconds", 0.0))
            + time.perf_counter()
            - started,
        }
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
        return result

    def federated(
        name: str, lr: float, mu: float | None = None, server_lr: float | None = None
    ) -> AdapterState:
        budget = dataclasses.replace(
            quality.budget,
            learning_rates=((name, lr),),
            proximal_mus=quality.budget.proximal_mus if mu is None else (mu,),
            server_learning_rate=(
                quality.budget.server_learning_rate if server_lr is None else server_lr
            ),
        )
        key = name if mu is None else f"fedprox-mu{mu:g}"
        variant = federated_configs(config, budget)[key]
        server = "" if server_lr is None else f"-server{server_lr:g}"
        run_dir = quality.out_dir / "sweep" / f"{key}-lr{lr:g}{server}"
        _, adapter = _federated(key, variant, run_dir, say, resume=quality.resume, site_sizes=sizes)
        return {**initial, **adapter}  # FFA-LoRA's state holds B only

    def measure(name: str, lr: float) -> dict[str, float]:
        if name == "centralized":
            *_, (_, _, _, state) = _centralized_states(trainer, learning_rate=lr)
            return trainer.evaluate_validation(state)
        if name == "local":
            scores = [
                trainer.evaluate_validation(state)
                for _, state, _ in _local_states(trainer, learning_rate=lr)
            ]
            return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
        return trainer.evaluate_validation(federated(name, lr))

    chosen: dict[str, Any] = {"learning_rates": {}, "proximal_mu": None}
    families = [a for a in ("centralized", "local", *FEDERATED) if a in quality.algorithms]
    server_swept = "fedadam" in families and bool(request.server_learning_rates)
    after_fedavg = {"fedprox", *(("fedadam",) if server_swept else ())}
    for name in (f for f in families if f not in after_fedavg):
        for lr in request.learning_rates:
            if f"{lr:g}" in points.get(name, {}):
                continue
            score = measure(name, lr)
            points.setdefault(name, {})[f"{lr:g}"] = score
            say(f"sweep {name} lr {lr:g}: validation loss {score['validation_loss']:.4f}")
            write(chosen, complete=False)
        chosen["learning_rates"][name] = float(_best(points[name]))

    def at_fedavg_rate(
        name: str,
        label: str,
        grid: tuple[float, ...],
        scores: dict[str, dict[str, float]],
        train: Callable[[float, float], AdapterState],
    ) -> float:
        """``name`` trains at FedAvg's chosen rate; the value of ``grid`` it does best with."""
        lr = chosen["learning_rates"].get("fedavg", quality.budget.learning_rate)
        for value in grid:
            if f"{value:g}" not in scores:
                scores[f"{value:g}"] = trainer.evaluate_validation(train(lr, value))
                say(f"sweep {label} {value:g}: {scores[f'{value:g}']['validation_loss']:.4f}")
                write(chosen, complete=False)
        chosen["learning_rates"][name] = lr
        return float(_best(scores))

    if "fedprox" in families and request.proximal_mus:
        chosen["proximal_mu"] = at_fedavg_rate(
            "fedprox", "fedprox mu", request.proximal_mus, mu_points,
            lambda lr, mu: federated("fedprox", lr, mu),
        )  # fmt: skip
    if server_swept:
        chosen["server_learning_rate"] = at_fedavg_rate(
            "fedadam", "fedadam server lr", request.server_learning_rates, server_points,
            lambda lr, server_lr: federated("fedadam", lr, server_lr=server_lr),
        )  # fmt: skip
    result = write(chosen, complete=True)
    say(f"sweep chose {chosen}; wrote {path}")
    return result
