"""The model card (``README.md``, Hugging Face format) written with an exported adapter.

It carries the adapter's provenance as the run's ledger and run folder record it: what the base
model is and its hash, what left each site, task, sites, rounds, strategy, precision, the
exported adapter file's sha256 against the ledger's, the gold-set figures with how their
intervals were computed, DP mode and final epsilon per site (recomputed from the ledger's DP
events), secure-aggregation mode and the ledger head hash, with which an auditor can match the
card to the evidence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsilo.config import FedsiloConfig
from fedsilo.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from fedsilo.evaluation.gold import HEADLINE_PART, RANKING_PART
from fedsilo.evaluation.metrics import SECONDARY_LABELS
from fedsilo.ledger import Entry, EntryKind
from fedsilo.model.base import BaseModelStatement, base_model_name
from fedsilo.report.model import PartRow
from fedsilo.report.numbers import recorded_float
from fedsilo.report.reader_text import EPSILON_OF_ACCEPTED_UPDATES_ONLY
from fedsilo.server.folder_checks import (
    FINAL_ADAPTER_FIELDS,
    PEFT_FILES,
    hash_file,
    last_aggregated_round,
)
from fedsilo.server.privacy_report import entries_through_round
from fedsilo.server.report_data import (
    last_verified_record,
    metric_meaning,
    metric_name,
    readable_entries,
    run_files,
)
from fedsilo.server.report_figures import gold_parts_of
from fedsilo.server.report_privacy import privacy_of
from fedsilo.server.report_provenance import (
    RunSetting,
    base_model_of,
    precision_fact,
    recorded_config,
    run_setting,
    strategy_fact,
)
from fedsilo.server.run_folder import RunFolder
from fedsilo.server.site_disclosure import enrolled_sites, what_left_the_sites
from fedsilo.storage import write_text_atomic

CARD_NAME = "README.md"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = PEFT_FILES
_NOT_RECORDED = "not recorded"
_SETTING: dict[RunSetting, str] = {
    "deployment": "across sites that each trained on their own records on their own node",
    "simulation": "in a simulation, with every site and its records on one machine",
    "unknown": "(whether its sites ran apart or on one machine is not established)",
}


def _yaml_string(text: str) -> str:
    # JSON strings are valid YAML scalars: quotes and escapes are handled for us.
    return json.dumps(text, ensure_ascii=False)


def model_card(run_dir: Path, exported: Path, *, checkpoint_round: int | None = None) -> str:
    """The card's Markdown for the adapter exported from ``run_dir`` into ``exported``.

    ``checkpoint_round`` is the round whose checkpoint was exported, None for the run's final
    adapter. Raises ValueError if the exported final adapter is not the file the ledger records.
    """
    folder = RunFolder(run_dir)
    raw_config, info = run_files(folder)
    entries = readable_entries(folder.ledger_path) if folder.ledger_path.exists() else []
    # Only a config.toml whose digest the ledger records speaks for the run.
    config = recorded_config(raw_config, entries)
    started = next((e for e in entries if e.kind is EntryKind.RUN_STARTED), None)
    start = started.payload if started else {}
    base = base_model_of(info, start, config)
    base_hash = start.get("base_model_hash") or info.get("base_model_hash")
    evaluated = _final_adapter_round(entries) if checkpoint_round is None else checkpoint_round
    # The adapter holds the rounds up to its own: a completed run resumed for more rounds has
    # ledgered later ones, which are not in the final/ it exported.
    of_adapter = entries if evaluated is None else entries_through_round(entries, evaluated)
    later_rounds = len(of_adapter) < len(entries)
    aggregated = [e for e in of_adapter if e.kind is EntryKind.ROUND_AGGREGATED]
    privacy = privacy_of(of_adapter, config)
    metric = metric_name(config, info)
    last = last_verified_record(folder, entries, evaluated)
    sites = enrolled_sites(start)
    finals = privacy.final_epsilon
    source = (
        "the final adapter"
        if checkpoint_round is None
        else f"the checkpoint of round {checkpoint_round}"
    )
    files = _exported_files(folder, entries, Path(exported), checkpoint_round)
    setting = run_setting(config, entries)
    strategy = strategy_fact(entries, config)
    precision = precision_fact(info, entries, simulated=setting == "simulation")
    lines = [
        "---",
        "library_name: peft",
        *_front_matter_base_model(base),
        "tags:",
        "- fedsilo",
        "- federated-learning",
        "- lora",
        "---",
        "",
        f"# {info.get('run_name') or folder.root.name}: a federated LoRA adapter",
        "",
        f"Trained with fedsilo by federated learning {_SETTING[setting]}. "
        "What each site sent is listed under *What left each site*; the run's signed ledger "
        "holds digests and signatures of the updates, not the updates (*Audit trail*).",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        *_base_model_rows(base),
        f"| Base model hash | `{base_hash or _NOT_RECORDED}` |",
        f"| Task | {config.task.name if config else _NOT_RECORDED} |",
        f"| Sites | {', '.join(sites) if sites else _NOT_RECORDED} |",
        f"| Rounds aggregated | {len({e.payload.get('round') for e in aggregated})} |",
        f"| Strategy | {strategy.value}{f' ({strategy.note})' if strategy.note else ''} |",
        f"| Precision | {precision.value} ({precision.note + '; ' if precision.note else ''}"
        f"the exported {ADAPTER_WEIGHTS} is fp32) |",
        f"| Differential privacy | {privacy.mode} |",
        f"| Secure aggregation | {privacy.secure_aggregation} |",
        f"| Adapter file | `{ADAPTER_WEIGHTS}` in this folder, sha256 `{files.weights_sha256}` |",
        f"| Run id | `{start.get('run_id') or _NOT_RECORDED}` |",
        f"| Ledger head hash | `{entries[-1].entry_hash if entries else _NOT_RECORDED}` |",
        f"| Exported from | {source} |",
        "",
        *what_left_the_sites(config, start, entries, run_dir=folder.root),
        *_audit_trail(),
        *files.lines,
    ]
    if (finals or privacy.site_level_epsilon) and privacy.delta is not None:
        lines += [
            f"## Privacy (\u03b4 = {privacy.delta:g}, {privacy.accountant} accountant)",
            "",
            (
                f"Recomputed from the DP events the ledger holds up to round {evaluated}, the "
                "exported adapter's; the sites spent more in the rounds the ledger records "
                "after it, which this adapter does not hold and this table does not count. "
                if later_rounds
                else "Recomputed from every DP event in the ledger. "
            )
            + "`fedsilo privacy RUN` composes the "
            "same events, but states \u03b5 through the last round reported in metrics.jsonl "
            "and lists updates ledgered after it apart, so for a run stopped mid-round the two "
            f"differ. {EPSILON_OF_ACCEPTED_UPDATES_ONLY}"
            + (
                " The run was a simulation: the coordinator's machine held every site's "
                "records, so \u03b5 bounds what the released adapter reveals (about one "
                "record, or one site under site-level DP) to whoever receives it, not what "
                "the coordinator could see."
                if setting == "simulation"
                else ""
            ),
            "",
            "| Site | DP mode | Final \u03b5 |",
            "|---|---|---|",
            *(
                f"| {site} | {privacy.site_modes.get(site, _NOT_RECORDED)} | {epsilon:.4f} |"
                for site, epsilon in sorted(finals.items())
            ),
        ]
        if privacy.site_level_epsilon:
            lines.append(
                "| any one site | site-level (of the aggregate) | "
                f"{privacy.site_level_epsilon[-1][1]:.4f} |"
            )
        lines.append("")
    elif privacy.events_recorded:
        lines += [
            "## Privacy",
            "",
            "The ledger holds differential privacy events, but no \u03b5 is given here:",
            "",
        ]
    if privacy.notes:
        lines += [*(f"- {note}" for note in privacy.notes), ""]
    if last:
        lines += _evaluation(last, metric, gold_parts_of(last), config)
    elif evaluated is not None:
        lines += [
            "## Evaluation",
            "",
            f"Not stated: metrics.jsonl holds no record of round {evaluated} that hashes to the "
            "metrics digest the ledger records for it.",
            "",
        ]
    lines += _how_to_load(base, base_hash)
    local = info.get("base_model_path")
    if local:
        lines += ["", f"On the coordinator the base model was read from `{local}`."]
    return "\n".join(lines) + "\n"


def _final_adapter_round(entries: Sequence[Entry]) -> int | None:
    """The round of the adapter in final/: the last run_finished that records one says how
    many rounds it holds; without one, the last round the ledger aggregated."""
    for entry in reversed(entries):
        if entry.kind is EntryKind.RUN_FINISHED and any(
            name in entry.payload for name in FINAL_ADAPTER_FIELDS
        ):
            rounds = entry.payload.get("rounds")
            if isinstance(rounds, int) and not isinstance(rounds, bool):
                return rounds
            break
    return last_aggregated_round(entries)


def write_export_provenance(
    run_dir: Path, out_dir: Path, *, checkpoint_round: int | None = None
) -> None:
    """Name the base model in ``out_dir``'s adapter_config.json and write the model card.

    ``checkpoint_round``: the round whose checkpoint ``out_dir`` holds, None for the final
    adapter.
    """
    folder = RunFolder(run_dir)
    raw_config, info = run_files(folder)
    entries = readable_entries(folder.ledger_path) if folder.ledger_path.exists() else []
    config = recorded_config(raw_config, entries)
    spec = str(info.get("base_model") or (config.model.base if config else ""))
    config_path = Path(out_dir) / ADAPTER_CONFIG
    settings = json.loads(config_path.read_text(encoding="utf-8"))
    if spec:
        settings["base_model_name_or_path"] = base_model_name(spec)
    write_text_atomic(config_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    card = model_card(run_dir, Path(out_dir), checkpoint_round=checkpoint_round)
    write_text_atomic(Path(out_dir) / CARD_NAME, card)


def _front_matter_base_model(base: BaseModelStatement | None) -> list[str]:
    """The card's ``base_model`` metadata, which the Hub reads as the model the adapter applies
    to: left out where no Hub model holds the weights used, with the reason as a comment."""
    if base is None:
        return []
    if base.origin is None:
        return [f"base_model: {_yaml_string(base.name)}"]
    return [
        f"# base_model is left out: the adapter was trained on {base.name} (see Provenance),",
        f"# not on {base.origin}, which is only the origin of its weights.",
    ]


def _base_model_rows(base: BaseModelStatement | None) -> list[str]:
    if base is None:
        return [f"| Base model | {_NOT_RECORDED} |"]
    rows = [f"| Base model | {base.name} |"]
    if base.weights:
        rows.append(f"| Base model weights | {base.weights} |")
    if base.origin:
        rows.append(
            f"| Origin (not the weights used) | {base.origin} on the Hugging Face Hub: "
            f"{base.origin_difference} |"
        )
    return rows


def _audit_trail() -> list[str]:
    return [
        "## Audit trail",
        "",
        "The run's ledger (`ledger.db` in its run folder) is a hash-chained list of entries, "
        "each signed by the coordinator. It does not hold the updates or the aggregates: for "
        "each accepted upload it holds the sha256 of the bytes the site sent, their size and "
        "the site's signature, with the metrics, DP event and policy declaration that came "
        "with it (where sent) in full; for each "
        "round, the sha256 of the aggregate; every DP event in full; and at the end, the "
        "sha256 of each file of the final adapter. Check it, and the run folder's checkpoints "
        "and final adapter against it, with `fedsilo audit verify RUN --coordinator-key FILE`.",
        "",
    ]


@dataclass(frozen=True)
class _ExportedFiles:
    """The exported folder's files, each with how its digest relates to the ledger's."""

    weights_sha256: str
    lines: list[str]


def _exported_files(
    folder: RunFolder, entries: Sequence[Entry], exported: Path, checkpoint_round: int | None
) -> _ExportedFiles:
    actual = hash_file(exported / ADAPTER_WEIGHTS)
    finished = [e for e in entries if e.kind is EntryKind.RUN_FINISHED]
    recorded = finished[-1].payload.get("final_files") if finished else None
    check = f"(`sha256sum {ADAPTER_WEIGHTS}` prints it)"
    if checkpoint_round is None:
        if not isinstance(recorded, dict) or not isinstance(recorded.get(ADAPTER_WEIGHTS), str):
            why = (
                "its run_finished entry records no file digests"
                if finished
                else "it has no run_finished entry"
            )
            weights = (
                f"`{ADAPTER_WEIGHTS}`: the LoRA adapter (fp32), sha256 `{actual}` {check}, a "
                f"copy of the run folder's final adapter; the ledger records no digest of this "
                f"file ({why})"
            )
            config_line = (
                f"`{ADAPTER_CONFIG}`: final/{ADAPTER_CONFIG} with `base_model_name_or_path` "
                "set by the export"
            )
        else:
            if recorded[ADAPTER_WEIGHTS] != actual:
                raise ValueError(
                    f"{exported / ADAPTER_WEIGHTS} hashes to {actual}, but the ledger records "
                    f"{recorded[ADAPTER_WEIGHTS]} for final/{ADAPTER_WEIGHTS}: not the adapter "
                    "the federation produced"
                )
            seq = finished[-1].seq
            weights = (
                f"`{ADAPTER_WEIGHTS}`: the LoRA adapter (fp32), sha256 `{actual}` {check}: the "
                f"digest the ledger records for the run folder's final/{ADAPTER_WEIGHTS} in its "
                f"run_finished entry (entry {seq}), which `fedsilo audit verify` checks"
            )
            same = recorded.get(ADAPTER_CONFIG) == hash_file(exported / ADAPTER_CONFIG)
            config_line = f"`{ADAPTER_CONFIG}`: final/{ADAPTER_CONFIG} " + (
                "as the ledger records it"
                if same
                else "with `base_model_name_or_path` set by the export (the run wrote the "
                "coordinator's local path), so its sha256 differs from the ledger's"
            )
    else:
        round_entry = next(
            (
                e
                for e in reversed(entries)
                if e.kind is EntryKind.ROUND_AGGREGATED
                and e.payload.get("round") == checkpoint_round
            ),
            None,
        )
        digest = round_entry.payload.get("adapter_sha256") if round_entry else None
        checkpoint = folder.checkpoint_dir(checkpoint_round) / "adapter.safetensors"
        weights = (
            f"`{ADAPTER_WEIGHTS}`: the LoRA adapter (fp32), sha256 `{actual}` {check}, written "
            f"at export from `{checkpoint.relative_to(folder.root)}`. The ledger holds no "
            "digest of this file (the run has no final adapter); "
            + (
                f"it records that checkpoint's file as `{digest}` (round_aggregated entry "
                f"{round_entry.seq}), a different layout of the same trained tensors"
                if round_entry is not None and digest
                else f"it records no aggregate of round {checkpoint_round}"
            )
        )
        config_line = f"`{ADAPTER_CONFIG}`: written at export"
    named = json.loads((exported / ADAPTER_CONFIG).read_text(encoding="utf-8")).get(
        "base_model_name_or_path"
    )
    if isinstance(named, str) and named:
        # Tools such as AutoPeftModelForCausalLM load the base from this field: say that it
        # is a name, so that nobody takes it for a Hub id or a path to the weights.
        config_line += (
            f". Its `base_model_name_or_path` is `{named}`, fedsilo's name for the base model, "
            "not a path to it: load the base as under *How to load*"
        )
    return _ExportedFiles(
        actual,
        [
            "## Files in this folder",
            "",
            f"- {weights}.",
            f"- {config_line}.",
            f"- `{CARD_NAME}`: this card, written at export; not in the ledger.",
            "",
        ],
    )


def _how_to_load(base: BaseModelStatement | None, base_hash: object) -> list[str]:
    lines = [
        "## How to load",
        "",
        "Load the adapter on the exact base model: a local folder whose weights hash to the "
        f"base model hash above (`fedsilo.model.base_model_hash(folder)` returns "
        f"`{base_hash or _NOT_RECORDED}` for it).",
    ]
    if base is not None and base.obtain:
        lines += ["", f"To get {base.name}: {base.obtain}."]
    return [
        *lines,
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'base_folder = "PATH/TO/BASE/MODEL/FOLDER"',
        "# local_files_only: a mistyped path must fail, not fetch a Hub model of that name.",
        "base = AutoModelForCausalLM.from_pretrained(base_folder, local_files_only=True)",
        "tokenizer = AutoTokenizer.from_pretrained(base_folder, local_files_only=True)",
        'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
        "```",
    ]


def _percent(value: object) -> str:
    number = recorded_float(value)
    return _NOT_RECORDED if number is None else f"{number * 100:.1f}%"


def _loss(value: object) -> str:
    # null where the loss was not finite (the run records it so rather than write NaN).
    number = recorded_float(value)
    return _NOT_RECORDED if number is None else f"{number:.4f}"


def _interval(pair: object) -> str:
    if isinstance(pair, list | tuple) and len(pair) == 2:
        return f"[{_percent(pair[0])}, {_percent(pair[1])}]"
    return ""


def _zero_width(pair: object) -> bool:
    return isinstance(pair, list | tuple) and len(pair) == 2 and pair[0] == pair[1]


def _evaluation(
    last: Mapping[str, Any],
    metric: str,
    parts: tuple[PartRow, ...],
    config: FedsiloConfig | None,
) -> list[str]:
    """The gold-set figures of the last round: both scores with what they measure, the
    interval where recorded and how it was computed, and each gold part (for ICD-10 the
    headline is the category accuracy on unseen codes, which the exact-code accuracy alone
    would understate), with what chance gives on the ranking part."""
    if "gold_accuracy" not in last:
        return []
    count = last.get("gold_count")
    secondary = SECONDARY_LABELS.get(metric, "secondary score")
    recorded_parts = last.get("gold_parts")
    recorded_parts = recorded_parts if isinstance(recorded_parts, dict) else {}
    headline_name = HEADLINE_PART.get(config.task.name, "gold") if config else "gold"
    headline = recorded_parts.get(headline_name)
    headline = headline if isinstance(headline, dict) else {}
    accuracy_ci = last.get("gold_accuracy_ci95") or headline.get("accuracy_ci95")
    which = f"part `{headline_name}`, " if headline else ""
    pooled = " (records resampled with their tokens pooled)" if metric == "next-token" else ""
    lines = [
        "## Evaluation",
        "",
        f"Held-out gold set after round {last.get('round')} ({which}"
        f"{count if count is not None else 'an unrecorded number of'} records; metric "
        f"`{metric}`, {metric_meaning(metric)}):",
        "",
        "| Figure | Value | 95% interval |",
        "|---|---|---|",
        f"| accuracy | {_percent(last['gold_accuracy'])} | {_interval(accuracy_ci)} |",
        f"| {secondary} | {_percent(last.get('gold_category_accuracy'))} | "
        f"{_interval(last.get('gold_category_accuracy_ci95'))} |",
        f"| mean answer loss | {_loss(last.get('gold_loss'))} | |",
        "",
        "Each 95% interval is a percentile bootstrap over the records of the set or part it "
        f"belongs to (the count given with it): {DEFAULT_RESAMPLES} resamples of its records "
        f"with replacement, seed {DEFAULT_SEED}, the 2.5th and 97.5th percentiles of the "
        f"resampled figure{pooled}. It reflects which records were drawn, not run-to-run "
        "variation of training.",
        "",
    ]
    if parts:
        lines += [
            "Gold-set parts, each scored and reported on its own:",
            "",
            "| Part | Figure | Value | 95% interval | Records |",
            "|---|---|---|---|---|",
            *(
                f"| {row.part} | {row.figure} | {_percent(row.value)} | "
                f"{_interval(row.ci95)} | {row.count if row.count is not None else ''} |"
                for row in parts
            ),
            "",
        ]
    intervals = [accuracy_ci, last.get("gold_category_accuracy_ci95"), *(r.ci95 for r in parts)]
    if any(_zero_width(pair) for pair in intervals):
        lines += [
            "An interval of zero width means every record of its set scored the same, so "
            "resampling cannot move the figure; it does not mean the model's true rate is "
            "exactly that value.",
            "",
        ]
    ranking = recorded_parts.get(RANKING_PART)
    candidates = ranking.get("candidates") if isinstance(ranking, dict) else None
    if isinstance(candidates, int) and candidates >= 2:
        lines += [
            f"Part `{RANKING_PART}`: for each record the model ranks the candidate answers "
            f"(the reference and up to {candidates - 1} others; {candidates} at most, as "
            "recorded) by the likelihood it gives each; top-1 is the share of records whose "
            "reference ranks first, top-5 within the first five (a tie counts against the "
            f"reference). Picking at random among {candidates} candidates gives top-1 "
            f"1/{candidates} = {100 / candidates:.1f}% and top-5 {min(5, candidates)}/"
            f"{candidates} = {100 * min(5, candidates) / candidates:.1f}%.",
            "",
        ]
    return lines
