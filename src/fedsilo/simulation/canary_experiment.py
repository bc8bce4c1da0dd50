"""Proof by attack: plant canaries in one site's records, federate, and attack the result.

One experiment: the ICD-10 task with ``num_sites`` sites by specialty, ``canaries`` secret
canaries planted ``repeats`` times each in the first site's records and as many never planted; a
federation is simulated with the given privacy settings; then the final global adapter is
attacked:

- exposure of every planted and never-planted canary (``fedsilo.privacy.attacks.canary``), and
  the Fisher-combined p-value of each group under "the model never saw these secrets";
- loss-threshold membership inference AUC, first site's records against held-out records of the
  same specialty that no site trained on.

Used by ``benchmarks/privacy_attacks.py`` and by the end-to-end attack tests.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig, parse_config
from fedsilo.config.schema import CompileSetting, PrecisionSetting
from fedsilo.data.icd10 import TaskData, build_icd10_task
from fedsilo.data.records import ChatRecord, load_records
from fedsilo.model.adapters import set_adapter_state
from fedsilo.privacy.attacks import (
    CANARY_PROMPT,
    Canary,
    exposure,
    exposure_p_value,
    loss_threshold_auc,
    loss_threshold_auc_ci,
    make_canaries,
    membership_losses,
    plant,
)
from fedsilo.server.federation import ProgressReporter
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.engines import SimulationRequest, simulate


@dataclass(frozen=True)
class CanaryExperiment:
    """The federation the attack runs on, and the attack's own sizes."""

    base_model: str
    num_sites: int = 2
    rounds: int = 3
    local_steps: int = 100
    batch_size: int = 8
    learning_rate: float = 0.01
    examples_per_site: int = 16
    canaries: int = 2  # planted; as many again are never planted
    repeats: int = 16
    candidates: int = 1000
    seed: int = 0
    precision: PrecisionSetting = "auto"  # [train] precision of the federation's sites
    compile: CompileSetting = "auto"  # [train] compile


@dataclass(frozen=True)
class AttackOutcome:
    """What the attacks found on one trained federation."""

    planted_exposure: list[float]
    never_inserted_exposure: list[float]
    planted_p_value: float
    never_inserted_p_value: float
    max_exposure: float
    membership_auc: float
    membership_auc_ci95: tuple[float, float]
    membership_records: int  # members, and as many non-members
    epsilon: dict[str, float] | None
    delta: float | None
    gold_loss: float
    # What the attacked model can do: category accuracy on the gold set and its interval.
    gold_category_accuracy: float | None
    gold_category_accuracy_ci95: list[float] | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "planted_exposure": self.planted_exposure,
            "never_inserted_exposure": self.never_inserted_exposure,
            "planted_mean": statistics.mean(self.planted_exposure),
            "never_inserted_mean": statistics.mean(self.never_inserted_exposure),
            "planted_p_value": self.planted_p_value,
            "never_inserted_p_value": self.never_inserted_p_value,
            "max_exposure": self.max_exposure,
            "membership_auc": self.membership_auc,
            "membership_auc_ci95": list(self.membership_auc_ci95),
            "membership_records": self.membership_records,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "gold_loss": self.gold_loss,
            "gold_category_accuracy": self.gold_category_accuracy,
            "gold_category_accuracy_ci95": self.gold_category_accuracy_ci95,
            "seconds": self.seconds,
        }


def _write_jsonl(path: Path, records: list[ChatRecord]) -> Path:
    lines = [json.dumps({"prompt": r.prompt, "response": r.response}) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _read_chat_records(path: Path) -> list[ChatRecord]:
    return [r for r in load_records(path) if isinstance(r, ChatRecord)]


def _canaries(experiment: CanaryExperiment) -> tuple[list[Canary], list[Canary]]:
    canaries = make_canaries(
        experiment.canaries * 2, digits=6, rng=np.random.default_rng(experiment.seed)
    )
    return canaries[: experiment.canaries], canaries[experiment.canaries :]


def write_attack_sites(
    task: TaskData,
    experiment: CanaryExperiment,
    work: Path,
    *,
    records_per_site: int,
    held_out: int,
) -> list[dict[str, str]]:
    """Write each site's training file to ``work`` (canaries planted in the first); their entries.

    Each site's records are shuffled and the first ``records_per_site`` are its training data;
    the next ``held_out`` of the first site are the membership attack's non-members
    (``held-out.jsonl``). The task lists a site's records in code order (a site of two
    specialties holds one chapter, then the other), so without the shuffle the halves would be
    different chapters and the attack would measure a change of topic, not membership;
    shuffled, members and non-members are draws from the same records.

    Raises:
        ValueError: the first site holds fewer than ``records_per_site + held_out`` records.
    """
    planted, _never = _canaries(experiment)
    rng = np.random.default_rng(experiment.seed + 1)
    work.mkdir(parents=True, exist_ok=True)
    sites = []
    for index, site in enumerate(task.sites):
        drawn: list[ChatRecord] = [r for r in site.records if isinstance(r, ChatRecord)]
        drawn = [drawn[i] for i in rng.permutation(len(drawn))]
        records = drawn[:records_per_site]
        if index == 0:
            non_members = drawn[records_per_site : records_per_site + held_out]
            if len(non_members) < held_out:
                raise ValueError(
                    f"site {site.name}: {len(drawn)} records, fewer than {records_per_site} "
                    f"to train on and {held_out} held out for the membership attack"
                )
            _write_jsonl(work / "held-out.jsonl", non_members)
            records = [
                r
                for r in plant(records, planted, repeats=experiment.repeats, rng=rng)
                if isinstance(r, ChatRecord)
            ]
        path = _write_jsonl(work / f"{site.name}.jsonl", records)
        sites.append({"name": site.name, "path": str(path)})
    _write_jsonl(work / "gold.jsonl", [r for r in task.gold if isinstance(r, ChatRecord)])
    return sites


def prepare(experiment: CanaryExperiment, work: Path, privacy: dict[str, Any]) -> FedsiloConfig:
    """Write the sites' files (canaries planted in the first), held-out records, gold; the config.

    Each site draws twice its share of records and trains on half of them; the first site's
    other half are the membership attack's non-members (:func:`write_attack_sites`).
    """
    size = experiment.examples_per_site
    task = build_icd10_task(
        num_sites=experiment.num_sites,
        partition="by-chapter",
        alpha=1.0,
        examples_per_site=2 * size,
        gold_size=experiment.examples_per_site,
        seed=experiment.seed,
    )
    sites = write_attack_sites(task, experiment, work, records_per_site=size, held_out=size)
    return parse_config(
        {
            "run": {
                "name": "canary-attack",
                "rounds": experiment.rounds,
                "torch_threads": 1,
                "require_site_policies": False,
            },
            "model": {"base": experiment.base_model},
            "task": {
                "name": "files",
                "sites": sites,
                "gold_path": str(work / "gold.jsonl"),
                "system_prompt": task.system_prompt,
                "metric": "code",
            },
            "train": {
                "local_steps": experiment.local_steps,
                "batch_size": experiment.batch_size,
                "learning_rate": experiment.learning_rate,
                "max_length": 96,
                "precision": experiment.precision,
                "compile": experiment.compile,
            },
            "strategy": {"min_sites": experiment.num_sites},
            "evaluation": {"max_new_tokens": 4},
            "privacy": privacy,
        },
        source="canary experiment",
    )


def attack(config: FedsiloConfig, run_dir: Path, experiment: CanaryExperiment) -> AttackOutcome:
    """Attack the final global adapter of the finished run in ``run_dir``."""
    started = time.perf_counter()
    loaded = load_model_with_adapter(config)
    folder = RunFolder(run_dir)
    set_adapter_state(
        loaded.model, folder.load_checkpoint(folder.latest_checkpoint_round() or 0).adapter
    )
    rng = np.random.default_rng(experiment.seed + 2)
    system_prompt = config.task.system_prompt

    def exposures(canaries: list[Canary]) -> list[float]:
        return [
            exposure(
                loaded.model,
                loaded.tokenizer,
                canary,
                candidates=experiment.candidates,
                rng=rng,
                system_prompt=system_prompt,
                batch_size=32,
            )
            for canary in canaries
        ]

    planted, never = _canaries(experiment)
    site_file = config.task.sites[0].path
    members = [r for r in _read_chat_records(site_file) if r.prompt != CANARY_PROMPT]
    held_out = _read_chat_records(site_file.parent / "held-out.jsonl")
    planted_exposure, never_exposure = exposures(planted), exposures(never)
    member_losses, nonmember_losses = membership_losses(
        loaded.model,
        loaded.tokenizer,
        members[: len(held_out)],
        held_out,
        system_prompt=system_prompt,
        batch_size=16,
        max_length=96,
    )
    final = folder.read_metrics()[-1]
    return AttackOutcome(
        planted_exposure=planted_exposure,
        never_inserted_exposure=never_exposure,
        planted_p_value=exposure_p_value(planted_exposure),
        never_inserted_p_value=exposure_p_value(never_exposure),
        max_exposure=float(np.log2(experiment.candidates + 1)),
        membership_auc=loss_threshold_auc(member_losses, nonmember_losses),
        membership_auc_ci95=loss_threshold_auc_ci(member_losses, nonmember_losses),
        membership_records=len(nonmember_losses),
        epsilon=final.get("epsilon"),
        delta=final.get("delta"),
        gold_loss=float(final["gold_loss"]),
        gold_category_accuracy=final.get("gold_category_accuracy"),
        gold_category_accuracy_ci95=final.get("gold_category_accuracy_ci95"),
        seconds=time.perf_counter() - started,
    )


def run_canary_experiment(
    experiment: CanaryExperiment,
    work: Path,
    *,
    privacy: dict[str, Any],
    reporter: ProgressReporter,
) -> AttackOutcome:
    """Prepare the sites in ``work``, simulate the federation, attack its final adapter."""
    config = prepare(experiment, work, privacy)
    run_dir = work / "run"
    started = time.perf_counter()
    simulate(SimulationRequest(config=config, run_dir=run_dir, resume=False, reporter=reporter))
    outcome = attack(config, run_dir, experiment)
    total = time.perf_counter() - started
    return AttackOutcome(**{**outcome.__dict__, "seconds": total})
