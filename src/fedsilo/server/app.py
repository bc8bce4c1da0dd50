"""The fedsilo ServerApp: prepares the run folder and the server side, then runs the rounds."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from peft import PeftModel

import fedsilo
from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import (
    ConfigError,
    FedsiloConfig,
    config_digest,
    config_to_toml,
    load_config,
    save_config,
)
from fedsilo.crypto import fingerprint, read_private_key
from fedsilo.data.hygiene import DataHygiene, check_data_hygiene
from fedsilo.data.icd10 import TaskData
from fedsilo.data.tasks import build_task
from fedsilo.evaluation.gold import evaluate_task_gold
from fedsilo.evaluation.metrics import GoldMetrics
from fedsilo.ledger import EntryKind, Ledger
from fedsilo.ledger.entries import DP_SETTINGS_FIELD
from fedsilo.model.adapters import AdapterState, export_peft_folder, set_adapter_state
from fedsilo.model.base import resolve_base_model
from fedsilo.privacy.trust import update_visibility
from fedsilo.server.audit import describe, verify_run
from fedsilo.server.federation import (
    FederationPlan,
    ProgressReporter,
    adapter_digest,
    run_federation,
)
from fedsilo.server.membership import Membership
from fedsilo.server.run_folder import RunFolder, final_file_digests
from fedsilo.server.site_dp import SiteLevelDp
from fedsilo.server.strategies import Strategy, build_strategy
from fedsilo.storage.atomic import fsync_folder
from fedsilo.training.compilation import CompileChoice
from fedsilo.training.precision import PrecisionChoice, forward_in

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerJob:
    """What the ServerApp is asked to do."""

    config: FedsiloConfig
    run_dir: Path
    resume: bool
    reporter: ProgressReporter
    membership: Membership  # pinned identities (RUN/federation.json)


def check_resume_config(saved: FedsiloConfig, requested: FedsiloConfig, *, source: Path) -> None:
    """A resumed run must use the settings it started with; only ``run.rounds`` may grow."""
    as_saved = saved.model_copy(update={"run": saved.run.model_copy(update={"rounds": 1})})
    as_requested = requested.model_copy(
        update={"run": requested.run.model_copy(update={"rounds": 1})}
    )
    if config_to_toml(as_saved) != config_to_toml(as_requested):
        saved_data = as_saved.model_dump(mode="json")
        requested_data = as_requested.model_dump(mode="json")
        differing = sorted(
            f"{section}.{key}"
            for section, values in requested_data.items()
            for key, value in (values or {}).items()  # an optional section may be None
            if (saved_data.get(section) or {}).get(key) != value
        )
        raise ConfigError(
            f"{source}: cannot resume with different settings; these differ from the run's "
            f"config: {', '.join(differing)}"
        )


def require_resumable(run_dir: Path) -> None:
    """Refuse to resume a run whose ledger is missing or does not verify.

    A resumed run extends the ledger's chain; without the history (a deleted ledger.db) it
    would start a new chain over the old checkpoints, and on a tampered one it would sign
    after the tampering. Checked before anything is written to the folder.
    """
    folder = RunFolder(run_dir)
    if not folder.ledger_path.is_file():
        raise ConfigError(
            f"{folder.ledger_path}: not found; cannot resume {folder.root} without its ledger "
            "(nothing was written)"
        )
    if not folder.membership_path.is_file():
        raise ConfigError(
            f"{folder.membership_path}: not found; cannot resume {folder.root} without the "
            "run's pinned keys"
        )
    report = verify_run(folder.root)
    if not report.ok:
        raise ConfigError(
            f"{folder.ledger_path}: cannot resume, the ledger does not verify: {describe(report)}"
        )


def _data_hygiene(
    config: FedsiloConfig, task: TaskData, reporter: ProgressReporter
) -> DataHygiene | None:
    """A simulation's data hygiene findings, each a warning (None in a deployment, where the
    coordinator never sees the sites' records)."""
    if config.deployment is not None:
        return None
    hygiene = check_data_hygiene(task, config.task)
    for line in hygiene.warnings():
        log.warning(line)
        reporter.notice(line)
    if hygiene.count:
        reporter.notice(f"data hygiene: {hygiene.count} finding(s), recorded in run.json")
    return hygiene


def _run_info(
    config: FedsiloConfig,
    base_hash: str,
    base_folder: Path,
    task: TaskData,
    precision: PrecisionChoice,
    compiled: CompileChoice,
) -> dict[str, Any]:
    return {
        "system_prompt": task.system_prompt,
        "metric": task.metric,
        "gold_count": len(task.gold),
        "run_name": config.run.name,
        "config_digest": config_digest(config),
        "base_model": config.model.base,
        "base_model_path": str(base_folder),
        "base_model_hash": base_hash,
        "fedsilo_version": fedsilo.__version__,
        "flwr_version": flwr.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        # How this process (the coordinator's evaluation, and every site in a simulation)
        # computes; a deployed site chooses its own and reports it each round.
        "precision": precision.precision,
        "precision_choice": precision.as_record(),
        "compile_choice": compiled.as_record(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def execute(grid: Grid, job: ServerJob) -> AdapterState:
    """Run the federation described by ``job`` over ``grid``; record its outcome."""
    folder = RunFolder(job.run_dir)
    config = job.config
    if job.resume:
        require_resumable(folder.root)
        check_resume_config(load_config(folder.config_path), config, source=folder.config_path)
    elif folder.latest_checkpoint_round() is not None or folder.ledger_path.exists():
        raise FileExistsError(
            f"{folder.root} already holds a run; resume it with --resume or choose another --out"
        )
    folder.root.mkdir(parents=True, exist_ok=True)
    save_config(config, folder.config_path)
    folder.write_json(folder.status_path, {"status": "running"})
    try:
        final = _execute(grid, job, folder)
    except BaseException as error:
        folder.write_json(
            folder.status_path, {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
        )
        raise
    folder.write_json(folder.status_path, {"status": "completed", "rounds": config.run.rounds})
    return final


def _execute(grid: Grid, job: ServerJob, folder: RunFolder) -> AdapterState:
    config = job.config
    loaded = load_model_with_adapter(config)
    base_folder = resolve_base_model(config.model.base)
    if job.resume and folder.run_info_path.exists():
        recorded = folder.read_json(folder.run_info_path)["base_model_hash"]
        if recorded != loaded.base_model_hash:
            raise ConfigError(
                f"{folder.run_info_path}: the run used base model {recorded}, but "
                f"{config.model.base} now hashes to {loaded.base_model_hash}"
            )
    task = build_task(config.task, seed=config.run.seed)
    hygiene = _data_hygiene(config, task, job.reporter)
    if not (job.resume and folder.run_info_path.exists()):
        info = _run_info(
            config, loaded.base_model_hash, base_folder, task, loaded.precision, loaded.compiled
        )
        if hygiene is not None:
            info["data_hygiene"] = hygiene.to_json()
        folder.write_json(folder.run_info_path, info)

    def evaluate(adapter: AdapterState) -> GoldMetrics:
        set_adapter_state(loaded.model, adapter)
        with forward_in(loaded.model, loaded.precision.precision):
            return evaluate_task_gold(
                loaded.model,
                loaded.tokenizer,
                task,
                max_new_tokens=config.evaluation.max_new_tokens,
                batch_size=config.evaluation.batch_size,
                max_length=config.train.max_length,
            )

    membership = job.membership
    coordinator_key = read_private_key(membership.coordinator_key_path, passphrase=None)
    with Ledger.open(folder.ledger_path, coordinator_key=coordinator_key) as ledger:
        if ledger.head() is None:
            ledger.append(
                EntryKind.RUN_STARTED,
                {
                    "federation_id": membership.federation_id,
                    "run_id": membership.run_id,
                    "run_name": config.run.name,
                    "config_digest": config_digest(config),
                    "base_model_hash": loaded.base_model_hash,
                    "initial_adapter_sha256": adapter_digest(loaded.adapter_template),
                    "strategy": config.strategy.name,
                    "server_momentum": config.strategy.server_momentum,
                    "secure_aggregation": config.secure_aggregation.mode,
                    "secure_aggregation_trust": update_visibility(config.secure_aggregation.mode),
                    # Under HE, which tensors were encrypted (empty: all): the trust line
                    # depends on it, and a report must not need config.toml to say it.
                    "he_tensors": list(config.secure_aggregation.he_tensors),
                    # The accountant and delta every epsilon is computed with, in the ledger
                    # itself: a report must not need config.toml to state the guarantee.
                    DP_SETTINGS_FIELD: {
                        "record_level": config.privacy.record_level,
                        "site_level": config.privacy.site_level,
                        "accountant": config.privacy.accountant,
                        "delta": config.privacy.delta,
                    },
                    "coordinator_fingerprint": fingerprint(coordinator_key.public_key()),
                    "sites": {name: fp for name, fp in membership.fingerprints().items()},
                    "fedsilo_version": fedsilo.__version__,
                    "precision": loaded.precision.precision,
                },
            )
        else:
            ledger.append(
                EntryKind.RUN_RESUMED,
                {
                    "config_digest": config_digest(config),
                    "after_round": folder.latest_checkpoint_round(),
                },
            )
        plan = FederationPlan(
            config=config,
            folder=folder,
            base_model_hash=loaded.base_model_hash,
            initial_adapter=loaded.adapter_template,
            strategy=_strategy(config),
            evaluate=evaluate,
            reporter=job.reporter,
            membership=membership,
            ledger=ledger,
            coordinator_key=coordinator_key,
        )
        final = run_federation(grid, plan, resume=job.resume)
        set_adapter_state(loaded.model, final)
        _publish_final(ledger, folder, loaded.model, final, base_folder, config.run.rounds)
    return final


def _publish_final(
    ledger: Ledger,
    folder: RunFolder,
    model: PeftModel,
    final: AdapterState,
    base_folder: Path,
    rounds: int,
) -> None:
    """Write final/ and its run_finished entry so that a crash at any point leaves a folder
    that verifies: the new final/ is built aside, an earlier one (a resumed run's) is moved
    out, the entry recording the new files is appended, and only then is final/ put in place.
    """
    staging = folder.root / ".final.staging"
    export_peft_folder(model, final, staging, base_model_path=str(base_folder), replace=True)
    if folder.final_dir.exists():
        retired = folder.root / ".final.retired"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(folder.final_dir, retired)
        shutil.rmtree(retired)
    ledger.append(
        EntryKind.RUN_FINISHED,
        {
            "rounds": rounds,
            "final_adapter_sha256": adapter_digest(final),
            "final_files": final_file_digests(staging),
        },
    )
    os.replace(staging, folder.final_dir)
    fsync_folder(folder.root)


def _strategy(config: FedsiloConfig) -> Strategy:
    strategy = build_strategy(config.strategy)
    privacy = config.privacy
    if not privacy.site_level:
        return strategy
    if config.secure_aggregation.mode != "none":
        # Distributed DP: the sites clip and add the noise before masking or encrypting; the
        # coordinator only ever sees the noised sum, and adds nothing.
        return strategy
    return SiteLevelDp(
        strategy,
        clip_norm=privacy.site_clip_norm,
        noise_multiplier=privacy.site_noise_multiplier,
        cohort_size=config.strategy.sites_per_round or config.num_sites,
    )


def build_server_app(job: ServerJob) -> ServerApp:
    """A ServerApp that runs ``job``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        del context  # the job carries the configuration
        execute(grid, job)

    return app
