"""The model card (``README.md``, Hugging Face format) written with an exported adapter.

It carries the adapter's provenance as the run's ledger and run folder record it: base model
name and hash, task, sites, rounds, strategy, precision, the metric and its gold count, DP mode
and final epsilon per site (recomputed from the ledger's DP events), secure-aggregation mode
and the ledger head hash, with which an auditor can match the card to the evidence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsilo.config import ConfigError, FedsiloConfig, load_config
from fedsilo.evaluation.metrics import SECONDARY_LABELS
from fedsilo.ledger import EntryKind
from fedsilo.model.base import base_model_name
from fedsilo.report.model import PartRow
from fedsilo.server.report_data import (
    gold_parts_of,
    metric_meaning,
    metric_name,
    privacy_of,
    readable_entries,
)
from fedsilo.server.run_folder import RunFolder
from fedsilo.storage import write_text_atomic

CARD_NAME = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
_NOT_RECORDED = "not recorded"


def _yaml_string(text: str) -> str:
    # JSON strings are valid YAML scalars: quotes and escapes are handled for us.
    return json.dumps(text, ensure_ascii=False)


def _load(folder: RunFolder) -> tuple[FedsiloConfig | None, dict[str, object]]:
    try:
        config: FedsiloConfig | None = load_config(folder.config_path)
    except (OSError, ConfigError, ValueError):
        config = None
    try:
        info = folder.read_json(folder.run_info_path)
    except (OSError, ValueError):
        info = {}
    return config, info


def model_card(run_dir: Path, *, source: str) -> str:
    """The card's Markdown for the adapter exported from ``run_dir`` (``source``: which one)."""
    folder = RunFolder(run_dir)
    config, info = _load(folder)
    entries = readable_entries(folder.ledger_path) if folder.ledger_path.exists() else []
    started = next((e for e in entries if e.kind is EntryKind.RUN_STARTED), None)
    start = started.payload if started else {}
    spec = str(info.get("base_model") or (config.model.base if config else ""))
    base_name = base_model_name(spec) if spec else _NOT_RECORDED
    aggregated = [e for e in entries if e.kind is EntryKind.ROUND_AGGREGATED]
    privacy = privacy_of(entries, config)
    metric = metric_name(config, info)
    metrics = folder.read_metrics() if folder.metrics_path.exists() else []
    last = metrics[-1] if metrics else {}
    enrolled = start.get("sites")
    sites = sorted(str(name) for name in enrolled) if isinstance(enrolled, dict) else []
    finals = privacy.final_epsilon
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {_yaml_string(base_name)}",
        "tags:",
        "- fedsilo",
        "- federated-learning",
        "- lora",
        "---",
        "",
        f"# {info.get('run_name') or folder.root.name}: a federated LoRA adapter",
        "",
        "Trained with fedsilo across data silos: each site trained on its own records and only "
        "adapter updates left it. Every update, aggregate and DP event is in the run's signed "
        "ledger; check it with `fedsilo audit verify RUN --coordinator-key FILE`.",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        f"| Base model | {base_name} |",
        f"| Base model hash | `{start.get('base_model_hash') or info.get('base_model_hash')}` |",
        f"| Task | {config.task.name if config else _NOT_RECORDED} |",
        f"| Sites | {', '.join(sites) if sites else _NOT_RECORDED} |",
        f"| Rounds aggregated | {len({e.payload.get('round') for e in aggregated})} |",
        f"| Strategy | {_strategy(start)} |",
        f"| Precision | {info.get('precision') or _NOT_RECORDED} |",
        f"| Differential privacy | {privacy.mode} |",
        f"| Secure aggregation | {privacy.secure_aggregation} |",
        f"| Run id | `{start.get('run_id') or _NOT_RECORDED}` |",
        f"| Ledger head hash | `{entries[-1].entry_hash if entries else _NOT_RECORDED}` |",
        f"| Exported from | {source} |",
        "",
    ]
    if finals or privacy.site_level_epsilon:
        lines += [
            f"## Privacy (\u03b4 = {privacy.delta:g}, {privacy.accountant} accountant)",
            "",
            "Recomputed from the DP events in the ledger (`fedsilo privacy RUN` prints the same).",
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
    lines += _evaluation(last, metric, gold_parts_of(folder))
    local = info.get("base_model_path")
    lines += [
        "## How to load",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base_name!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({base_name!r})",
        'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
        "```",
        "",
        "Check that the base model's weights hash to the base model hash above "
        "(fedsilo's `base_model_hash`) before trusting the adapter's behaviour.",
    ]
    if local:
        lines += ["", f"On the coordinator the base model was read from `{local}`."]
    return "\n".join(lines) + "\n"


def write_export_provenance(run_dir: Path, out_dir: Path, *, source: str) -> None:
    """Name the base model in ``out_dir``'s adapter_config.json and write the model card."""
    folder = RunFolder(run_dir)
    config, info = _load(folder)
    spec = str(info.get("base_model") or (config.model.base if config else ""))
    config_path = Path(out_dir) / ADAPTER_CONFIG
    settings = json.loads(config_path.read_text(encoding="utf-8"))
    if spec:
        settings["base_model_name_or_path"] = base_model_name(spec)
    write_text_atomic(config_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    write_text_atomic(Path(out_dir) / CARD_NAME, model_card(run_dir, source=source))


def _strategy(start: Mapping[str, object]) -> str:
    """The strategy the run-start entry names, with its server momentum when it had one."""
    name = start.get("strategy")
    if not name:
        return _NOT_RECORDED
    momentum = start.get("server_momentum")
    if isinstance(momentum, int | float) and momentum > 0:
        return f"{name}, server momentum {momentum:g}"
    return str(name)


def _percent(value: object) -> str:
    return f"{float(value) * 100:.1f}%" if isinstance(value, int | float) else _NOT_RECORDED


def _interval(pair: object) -> str:
    if isinstance(pair, list | tuple) and len(pair) == 2:
        return f"[{_percent(pair[0])}, {_percent(pair[1])}]"
    return ""


def _evaluation(last: Mapping[str, Any], metric: str, parts: tuple[PartRow, ...]) -> list[str]:
    """The gold-set figures of the last round: both scores with what they measure, the
    interval where recorded, and each gold part (for ICD-10 the headline is the category
    accuracy on unseen codes, which the exact-code accuracy alone would understate)."""
    if "gold_accuracy" not in last:
        return []
    count = last.get("gold_count")
    secondary = SECONDARY_LABELS.get(metric, "secondary score")
    lines = [
        "## Evaluation",
        "",
        f"Held-out gold set after round {last.get('round')} "
        f"({count if count is not None else 'an unrecorded number of'} examples; metric "
        f"`{metric}`, {metric_meaning(metric)}):",
        "",
        "| Figure | Value | 95% interval |",
        "|---|---|---|",
        f"| accuracy | {_percent(last['gold_accuracy'])} | |",
        f"| {secondary} | {_percent(last.get('gold_category_accuracy'))} | "
        f"{_interval(last.get('gold_category_accuracy_ci95'))} |",
        f"| mean answer loss | {float(last['gold_loss']):.4f} | |",
        "",
    ]
    if parts:
        lines += [
            "Gold-set parts, each scored and reported on its own:",
            "",
            "| Part | Figure | Value | 95% interval | Examples |",
            "|---|---|---|---|---|",
            *(
                f"| {row.part} | {row.figure} | {_percent(row.value)} | "
                f"{_interval(row.ci95)} | {row.count if row.count is not None else ''} |"
                for row in parts
            ),
            "",
        ]
    return lines
