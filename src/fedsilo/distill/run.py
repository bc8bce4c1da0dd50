"""``fedsilo distill``: the master adapter, its files, and its provenance ledger.

DIR/ (the output folder) holds::

    final/            the master adapter, PEFT format (PeftModel.from_pretrained, fedsilo export)
    transfer.jsonl    the transfer set, byte for byte as read
    metrics.json      the distillation loss before and after, per step, timings
    federation.json   the coordinator key that signs the ledger (no site takes part)
    ledger.db         run_started (hyperparameters, base model hash), distill_sources (each
                      expert's adapter sha256, the transfer set's sha256, the experts' source
                      run and its ledger head), run_finished (the master's sha256)
    status.json       running, completed or failed

``fedsilo audit verify DIR`` checks the ledger and that every file it names still hashes to
what it recorded, including the experts and, when they came from a clustered run, that run's
whole ledger (fedsilo.server.lineage).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fedsilo
from fedsilo.config import load_config
from fedsilo.crypto import (
    PrivateKey,
    fingerprint,
    init_site_keys,
    public_key_text,
    read_private_key,
    sha256_hex,
)
from fedsilo.data.encode import encode_records
from fedsilo.data.records import ChatRecord
from fedsilo.data.tasks import build_task
from fedsilo.distill.experts import Expert, load_experts
from fedsilo.distill.train import RouterName, mean_kl, soft_labels, train_student
from fedsilo.distill.transfer import TransferRecord, parse_transfer, site_overlap
from fedsilo.ledger import EntryKind, JsonValue, Ledger, read_entries
from fedsilo.model.adapters import (
    attach_lora,
    export_peft_folder,
    get_adapter_state,
    set_adapter_state,
)
from fedsilo.model.base import ModelError, base_model_hash, load_base_model, resolve_base_model
from fedsilo.server.federation import adapter_digest
from fedsilo.server.membership import Membership, load_membership, save_membership
from fedsilo.server.run_folder import RunFolder, final_file_digests
from fedsilo.storage import write_bytes_atomic

log = logging.getLogger(__name__)

TRANSFER_COPY = "transfer.jsonl"
FEDERATION_ID = "fedsilo-distillation"


class DistillError(ValueError):
    """The distillation cannot run as asked; the message names the file or setting."""


@dataclass(frozen=True)
class DistillSettings:
    """The hyperparameters of one distillation, recorded in its ledger."""

    temperature: float = 2.0
    steps: int = 64
    batch_size: int = 4
    learning_rate: float = 1e-3
    max_length: int = 96
    max_grad_norm: float | None = 1.0
    seed: int = 0
    router: RouterName = "label"

    def __post_init__(self) -> None:
        checks = {
            "temperature": self.temperature > 0,
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_rate": 0 < self.learning_rate <= 1,
            "max_length": self.max_length >= 8,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "seed": self.seed >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise DistillError(f"distillation settings out of range: {', '.join(bad)}")


@dataclass(frozen=True)
class DistillResult:
    """What a distillation produced."""

    out_dir: Path
    kl_before: float
    kl_after: float
    experts: tuple[str, ...]
    routed: dict[str, int]  # expert -> transfer examples it taught
    coordinator_key: Path  # the private key that signed the ledger


def _agreed(experts: list[Expert], key: str) -> Any:
    values = {json.dumps(e.info.get(key)) for e in experts if key in e.info}
    if len(values) > 1:
        raise DistillError(f"the experts disagree on {key}: {sorted(values)}")
    return json.loads(values.pop()) if values else None


def _source_run(experts_dir: Path, experts: list[Expert]) -> dict[str, JsonValue] | None:
    """The clustered run the experts came from (RUN/experts), checked against its ledger."""
    run = RunFolder(experts_dir.resolve().parent)
    if not (run.ledger_path.exists() and run.membership_path.exists()):
        return None
    entries = read_entries(run.ledger_path)
    recorded = {
        str(e.payload.get("cluster")): str(e.payload.get("peft_sha256"))
        for e in entries
        if e.kind is EntryKind.EXPERT_FINISHED
    }
    if not recorded:
        return None
    for expert in experts:
        if recorded.get(expert.name) != expert.peft_sha256:
            raise DistillError(
                f"{expert.folder}: its adapter hashes to {expert.peft_sha256}, but the run's "
                f"ledger {run.ledger_path} records {recorded.get(expert.name)}"
            )
    membership = load_membership(run.membership_path)
    return {
        "folder": str(run.root),
        "federation_id": membership.federation_id,
        "run_id": membership.run_id,
        "ledger_entries": len(entries),
        "ledger_head_seq": entries[-1].seq,
        "ledger_head_hash": entries[-1].entry_hash,
    }


def _check_no_site_data(source: dict[str, JsonValue] | None, records: list[TransferRecord]) -> bool:
    """Refuse a transfer set that shares a record with a site of the source run.

    Only a simulation can check this (the coordinator rebuilds the sites' synthetic data from
    the config); returns whether the check ran.
    """
    if source is None:
        return False
    config = load_config(RunFolder(Path(str(source["folder"]))).config_path)
    task = build_task(config.task, seed=config.run.seed)
    shared = site_overlap(records, task)
    if shared:
        raise DistillError(
            f"the transfer set shares {len(shared)} record(s) with the sites or the gold set of "
            f"{source['folder']} (first: {shared[0].prompt!r}); it must hold public data only"
        )
    return True


def _coordinator_key(out: Path, given: Path | None, source: dict[str, JsonValue] | None) -> Path:
    if given is not None:
        return given
    if source is not None:
        membership = load_membership(RunFolder(Path(str(source["folder"]))).membership_path)
        if membership.coordinator_key_path.exists():
            return membership.coordinator_key_path
    path = out / "coordinator" / "coordinator.key"
    if not path.exists():
        init_site_keys("coordinator", path.parent, passphrase=None)
    return path


def distill(
    experts_dir: Path,
    transfer_path: Path,
    out_dir: Path,
    *,
    settings: DistillSettings,
    base: str | None = None,
    system_prompt: str | None = None,
    coordinator_key: Path | None = None,
) -> DistillResult:
    """Distill the experts in ``experts_dir`` into one master adapter in ``out_dir``."""
    out = Path(out_dir)
    folder = RunFolder(out)
    if folder.ledger_path.exists() or folder.final_dir.exists():
        raise FileExistsError(f"{out} already holds a distillation; choose another --out")
    experts = load_experts(Path(experts_dir))
    # Parsed from the bytes that are hashed and copied, so all three are the same set.
    transfer_bytes = Path(transfer_path).read_bytes()
    records = parse_transfer(transfer_bytes, source=str(transfer_path))
    base_spec = base or experts[0].base_model_path
    base_folder = resolve_base_model(base_spec)
    base_hash = base_model_hash(base_folder)
    expected = _agreed(experts, "base_model_hash")
    if expected is not None and expected != base_hash:
        raise ModelError(
            f"the experts were trained on base model {expected}; {base_spec} is {base_hash}"
        )
    prompt = system_prompt if system_prompt is not None else _agreed(experts, "system_prompt")
    source = _source_run(Path(experts_dir), experts)
    overlap_checked = _check_no_site_data(source, records)

    out.mkdir(parents=True, exist_ok=True)
    key_path = _coordinator_key(out, coordinator_key, source)
    key = read_private_key(key_path, passphrase=None)
    membership = Membership(
        federation_id=str(source["federation_id"]) if source else FEDERATION_ID,
        run_id=uuid.uuid4().hex,
        coordinator_key_path=key_path,
        coordinator_public_key=public_key_text(key.public_key()),
        site_public_keys={},
    )
    save_membership(membership, folder.membership_path)
    write_bytes_atomic(out / TRANSFER_COPY, transfer_bytes)
    folder.write_json(folder.status_path, {"status": "running"})
    try:
        result = _distill(
            experts,
            records,
            out,
            settings,
            base_folder,
            base_hash,
            prompt,
            membership,
            key,
            provenance={
                "experts_dir": str(Path(experts_dir).resolve()),
                "source_run": source,
                "transfer_sha256": sha256_hex(transfer_bytes),
                "overlap_checked": overlap_checked,
            },
        )
    except BaseException as error:
        folder.write_json(
            folder.status_path, {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
        )
        raise
    folder.write_json(folder.status_path, {"status": "completed"})
    return result


def _distill(
    experts: list[Expert],
    records: list[TransferRecord],
    out: Path,
    settings: DistillSettings,
    base_folder: Path,
    base_hash: str,
    system_prompt: str | None,
    membership: Membership,
    key: PrivateKey,
    *,
    provenance: dict[str, Any],
) -> DistillResult:
    folder = RunFolder(out)
    started = time.perf_counter()
    model_base, tokenizer = load_base_model(base_folder)
    shape = experts[0].settings
    model = attach_lora(
        model_base,
        rank=int(shape["r"]),
        alpha=float(shape["lora_alpha"]),
        dropout=float(shape.get("lora_dropout") or 0.0),
        target_modules=sorted(shape["target_modules"]),
        init_seed=settings.seed,
    )
    initial = get_adapter_state(model)
    pad_id = int(tokenizer.pad_token_id)
    examples = encode_records(
        tokenizer,
        [ChatRecord(prompt=r.prompt, response=r.response) for r in records],
        system_prompt=system_prompt,
        max_length=settings.max_length,
        source=f"transfer set {provenance['transfer_sha256'][:12]}",
    )
    if len(examples) != len(records):
        raise DistillError("some transfer records keep no answer token within max_length")
    with Ledger.open(folder.ledger_path, coordinator_key=key) as ledger:
        ledger.append(
            EntryKind.RUN_STARTED,
            {
                "kind": "distillation",
                "federation_id": membership.federation_id,
                "run_id": membership.run_id,
                "base_model_hash": base_hash,
                "hyperparameters": _plain(asdict(settings)),
                "student_lora": {
                    "rank": int(shape["r"]),
                    "alpha": float(shape["lora_alpha"]),
                    "target_modules": sorted(shape["target_modules"]),
                },
                "initial_adapter_sha256": adapter_digest(initial),
                "system_prompt": system_prompt,
                "coordinator_fingerprint": fingerprint(key.public_key()),
                "sites": {},
                "fedsilo_version": fedsilo.__version__,
            },
        )
        ledger.append(
            EntryKind.DISTILL_SOURCES,
            {
                "experts": {
                    e.name: {
                        "peft_sha256": e.peft_sha256,
                        "adapter_sha256": e.adapter_sha256,
                        "sites": _plain(e.info.get("sites")),
                    }
                    for e in experts
                },
                "experts_dir": provenance["experts_dir"],
                "source_run": provenance["source_run"],
                "transfer": {
                    "file": TRANSFER_COPY,
                    "sha256": provenance["transfer_sha256"],
                    "records": len(records),
                    "site_overlap_checked": provenance["overlap_checked"],
                },
                "router": settings.router,
            },
        )
        teachers = soft_labels(
            model,
            examples,
            {e.name: e.state for e in experts},
            router=settings.router,
            labels=[r.expert for r in records],
            batch_size=settings.batch_size,
            pad_id=pad_id,
        )
        # The student starts as the fresh adapter: B = 0, so exactly the base model.
        set_adapter_state(model, initial)
        kl_before = mean_kl(
            model,
            examples,
            teachers,
            temperature=settings.temperature,
            batch_size=settings.batch_size,
            pad_id=pad_id,
        )
        student = train_student(
            model,
            examples,
            teachers,
            initial=initial,
            steps=settings.steps,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            temperature=settings.temperature,
            max_grad_norm=settings.max_grad_norm,
            pad_id=pad_id,
            seed=settings.seed,
        )
        kl_after = mean_kl(
            model,
            examples,
            teachers,
            temperature=settings.temperature,
            batch_size=settings.batch_size,
            pad_id=pad_id,
        )
        export_peft_folder(
            model, student.adapter, folder.final_dir, base_model_path=str(base_folder)
        )
        routed = {e.name: teachers.experts.count(e.name) for e in experts}
        folder.write_json(
            out / "metrics.json",
            {
                "kl_before": kl_before,
                "kl_after": kl_after,
                "losses": list(student.losses),
                "answer_tokens": student.tokens,
                "routed": routed,
                "train_seconds": student.seconds,
                "seconds": time.perf_counter() - started,
            },
        )
        ledger.append(
            EntryKind.RUN_FINISHED,
            {
                "final_adapter_sha256": adapter_digest(student.adapter),
                "final_peft_sha256": sha256_hex(
                    (folder.final_dir / "adapter_model.safetensors").read_bytes()
                ),
                "final_files": final_file_digests(folder.final_dir),
                "kl_before": kl_before,
                "kl_after": kl_after,
                "routed": _plain(routed),
                "steps": settings.steps,
            },
        )
    return DistillResult(
        out,
        kl_before,
        kl_after,
        tuple(e.name for e in experts),
        routed,
        membership.coordinator_key_path,
    )


def _plain(value: object) -> JsonValue:
    return json.loads(json.dumps(value))  # type: ignore[no-any-return]
