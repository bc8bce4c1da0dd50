"""What a run hands over: its adapter as a PEFT folder, and answers from the federated model."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import load_config
from fedsilo.evaluation.gold import generate_answers
from fedsilo.model.adapters import AdapterState, export_peft_folder, set_adapter_state
from fedsilo.model.base import resolve_base_model
from fedsilo.server.audit import describe, verify_run
from fedsilo.server.model_card import write_export_provenance
from fedsilo.server.run_folder import RunFolder
from fedsilo.storage import atomic_folder


def _latest_adapter(folder: RunFolder) -> tuple[AdapterState, int]:
    last = folder.latest_checkpoint_round()
    if last is None:
        raise FileNotFoundError(f"{folder.root}: no checkpoint and no final/ adapter in this run")
    return folder.load_checkpoint(last).adapter, last


class UnverifiedRunError(ValueError):
    """The run's adapter is not the one its ledger vouches for; it is not used."""


class ExportRefusedError(UnverifiedRunError):
    """The run's adapter is not the one its ledger vouches for; nothing is exported."""


def _require_verified(
    folder: RunFolder, *, use: str, error: type[UnverifiedRunError] = UnverifiedRunError
) -> None:
    report = verify_run(folder.root)
    if not report.ok:
        raise error(
            f"{folder.root}: refusing to {use} an adapter the run's ledger does not vouch "
            f"for; {describe(report)} (see `fedsilo audit verify {folder.root}`)"
        )


def export_run(run_dir: Path, out: Path) -> str:
    """Write the run's adapter to ``out`` as a PEFT folder; returns where it came from.

    The run must pass `fedsilo audit verify` (under the coordinator key pinned in the run
    folder), else ExportRefusedError. A completed run's final/ folder is copied; for an
    unfinished run the latest checkpoint is exported (which needs the base model, to write
    the PEFT config). Either way the folder names the base model in adapter_config.json by
    :func:`fedsilo.model.base.base_model_name` (not a local path, and for the embedded default
    not the Hub model it derives from, whose weights differ) and gets a model card, README.md,
    with the run's provenance.
    """
    folder = RunFolder(run_dir)
    if not folder.root.is_dir():
        raise FileNotFoundError(f"{folder.root}: no such run folder")
    _require_verified(folder, use="export", error=ExportRefusedError)
    if (folder.final_dir / "adapter_config.json").exists():
        with atomic_folder(out) as tmp:
            for item in folder.final_dir.iterdir():
                shutil.copy2(item, tmp / item.name)
            write_export_provenance(folder.root, tmp)
        return str(folder.final_dir)
    config = load_config(folder.config_path)
    adapter, last = _latest_adapter(folder)
    loaded = load_model_with_adapter(config)
    set_adapter_state(loaded.model, adapter)
    base_path = str(resolve_base_model(config.model.base))
    with atomic_folder(out) as tmp:
        export_peft_folder(loaded.model, adapter, tmp / "adapter", base_model_path=base_path)
        for item in (tmp / "adapter").iterdir():
            item.rename(tmp / item.name)
        (tmp / "adapter").rmdir()
        write_export_provenance(folder.root, tmp, checkpoint_round=last)
    return str(folder.checkpoint_dir(last))


def generate_from_run(run_dir: Path, prompt: str, *, max_new_tokens: int) -> str:
    """Greedy answer of the run's federated model (its latest checkpoint, which a completed
    run's final/ equals). The run must pass `fedsilo audit verify` first, as for export: an
    answer from an adapter the ledger does not vouch for would be an answer from an unknown
    model (UnverifiedRunError)."""
    folder = RunFolder(run_dir)
    if not folder.root.is_dir():
        raise FileNotFoundError(f"{folder.root}: no such run folder")
    _require_verified(folder, use="answer from")
    config = load_config(folder.config_path)
    info = folder.read_json(folder.run_info_path)
    loaded = load_model_with_adapter(config)
    adapter, _ = _latest_adapter(folder)
    set_adapter_state(loaded.model, adapter)
    system_prompt = info.get("system_prompt")
    [answer] = generate_answers(
        loaded.model,
        loaded.tokenizer,
        [prompt],
        system_prompt=system_prompt if isinstance(system_prompt, str) else None,
        max_new_tokens=max_new_tokens,
        batch_size=1,
        max_prompt_length=config.train.max_length * 4,
    )
    return answer.strip()
