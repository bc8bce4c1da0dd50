"""The transfer set: public prompts and answers the master learns the experts' outputs on.

A transfer set is a JSONL file, one object per line with ``prompt`` and ``response`` (text)
and optionally ``expert`` (the name of the expert that answers it, read by the "label"
router). It must hold no site's records: :func:`build_icd10_transfer` draws ICD-10-CM codes
of each cluster's chapters that no site holds and the gold set does not contain, and
:func:`site_overlap` finds any record that is also a site's or a gold record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsilo.data.icd10 import TaskData, chapter_of_code, icd10_prompt, load_icd10_codes
from fedsilo.data.records import ChatRecord, DataError
from fedsilo.storage import write_text_atomic


@dataclass(frozen=True)
class TransferRecord:
    """One transfer example; ``expert`` names the expert that answers it (or None)."""

    prompt: str
    response: str
    expert: str | None = None


def load_transfer(path: Path) -> list[TransferRecord]:
    """Read a transfer JSONL file; DataError naming the file, line and field on bad input."""
    path = Path(path)
    try:
        return parse_transfer(path.read_bytes(), source=str(path))
    except OSError as error:
        raise DataError(f"{path}: cannot read the transfer set: {error}") from None


def parse_transfer(data: bytes, *, source: str) -> list[TransferRecord]:
    """The records of a transfer JSONL file's bytes; errors name ``source`` and the line."""
    path = source
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: the transfer set is not UTF-8 text: {error}") from None
    records: list[TransferRecord] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object")
        for field in ("prompt", "response"):
            if not isinstance(data.get(field), str) or not data[field].strip():
                raise DataError(f"{path}: line {number}: field {field!r} must be non-empty text")
        expert = data.get("expert")
        if expert is not None and not isinstance(expert, str):
            raise DataError(f"{path}: line {number}: field 'expert' must be text")
        unknown = sorted(set(data) - {"prompt", "response", "expert"})
        if unknown:
            raise DataError(f"{path}: line {number}: unknown fields {unknown}")
        records.append(TransferRecord(data["prompt"], data["response"], expert))
    if not records:
        raise DataError(f"{path}: the transfer set holds no records")
    return records


def transfer_jsonl(records: Iterable[TransferRecord]) -> str:
    """The JSONL text of ``records`` (sorted keys, one object per line)."""
    lines = []
    for record in records:
        data = {"prompt": record.prompt, "response": record.response}
        if record.expert is not None:
            data["expert"] = record.expert
        lines.append(json.dumps(data, sort_keys=True, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def write_transfer(records: Sequence[TransferRecord], path: Path) -> None:
    """Write ``records`` as a transfer JSONL file, atomically."""
    write_text_atomic(Path(path), transfer_jsonl(records))


def site_overlap(records: Sequence[TransferRecord], task: TaskData) -> list[TransferRecord]:
    """Transfer records that share a prompt with any site or gold record.

    For the ICD-10 task a shared answer (the same code) counts too: the code is the record.
    """
    chat = [r for site in task.sites for r in site.records if isinstance(r, ChatRecord)]
    chat += list(task.gold)
    prompts = {record.prompt for record in chat}
    responses = {record.response for record in chat} if task.name == "icd10" else set()
    return [r for r in records if r.prompt in prompts or r.response in responses]


def build_icd10_transfer(
    task: TaskData, clusters: dict[str, Sequence[str]], *, per_expert: int, seed: int
) -> list[TransferRecord]:
    """``per_expert`` public ICD-10-CM records per cluster, from its sites' chapters.

    Excluded: every code a site trains on or the gold set holds, and every description any
    of them uses (so no prompt is a site's). Raises ValueError if a cluster's chapters have
    too few codes left, or a cluster names a site the task does not have.
    """
    if task.name != "icd10":
        raise ValueError(f"an ICD-10 transfer set needs the icd10 task, not {task.name!r}")
    by_name = {site.name: site for site in task.sites}
    taken = [r for site in task.sites for r in site.records if isinstance(r, ChatRecord)]
    taken += list(task.gold)
    taken_codes = {record.response for record in taken}
    taken_prompts = {record.prompt for record in taken}
    codes = load_icd10_codes()
    rng = np.random.default_rng(seed)
    records: list[TransferRecord] = []
    for name in sorted(clusters):
        unknown = sorted(set(clusters[name]) - set(by_name))
        if unknown:
            raise ValueError(f"expert {name!r} names sites {unknown} that the task does not have")
        chapters = {
            chapter_of_code(record.response)
            for site in clusters[name]
            for record in by_name[site].records
            if isinstance(record, ChatRecord)
        }
        candidates = [
            code
            for code in codes
            if code.chapter in chapters
            and code.code not in taken_codes
            and icd10_prompt(code.description) not in taken_prompts
        ]
        if len(candidates) < per_expert:
            raise ValueError(
                f"expert {name!r}: only {len(candidates)} public codes left in chapters "
                f"{sorted(c for c in chapters if c)}, fewer than {per_expert}"
            )
        picked = sorted(int(i) for i in rng.choice(len(candidates), size=per_expert, replace=False))
        records += [
            TransferRecord(icd10_prompt(candidates[i].description), candidates[i].code, name)
            for i in picked
        ]
    return records


def build_transfer_for_run(run_dir: Path, *, per_expert: int, seed: int) -> list[TransferRecord]:
    """:func:`build_icd10_transfer` for a clustered run: its task, its experts' sites."""
    from fedsilo.config import load_config
    from fedsilo.data.tasks import build_task

    run = Path(run_dir)
    config = load_config(run / "config.toml")
    task = build_task(config.task, seed=config.run.seed)
    clusters: dict[str, Sequence[str]] = {}
    experts = run / "experts"
    for info_path in sorted(experts.glob("*/expert.json")):
        info = json.loads(info_path.read_text(encoding="utf-8"))
        clusters[info_path.parent.name] = [str(site) for site in info["sites"]]
    if not clusters:
        raise DataError(f"{experts}: no expert with an expert.json (is {run} a clustered run?)")
    return build_icd10_transfer(task, clusters, per_expert=per_expert, seed=seed)
