"""The quality and scale sections of docs/benchmarks.md, and their SVG plots in docs/img/.

Called by benchmarks/report.py; every number comes from benchmarks/results/quality-*.json
(written by `fedsilo bench quality`) and benchmarks/results/scale.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedsilo.bench.settings import TASK_PRESETS, headline_metric
from fedsilo.report.svg import line_chart

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "img"

ORDER = ("centralized", "local", "fedavg", "fedprox", "fedadam", "ffa-lora")
GOAL_RATIO = 0.97
# Federated must beat the mean local-only site by this much (accuracy, as a fraction).
LOCAL_MARGIN = 0.15


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _mb(value: float) -> str:
    return f"{value / 2**20:.2f} MB"


def _sort_key(name: str) -> tuple[int, str]:
    family = "fedprox" if name.startswith("fedprox") else name
    return (ORDER.index(family) if family in ORDER else len(ORDER), name)


def _write_svg(name: str, svg: str) -> str:
    # A standalone .svg file needs the namespace that inline SVG in HTML does without.
    IMAGES.mkdir(parents=True, exist_ok=True)
    (IMAGES / name).write_text(svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1))
    return f"img/{name}"


def _final(result: dict[str, Any]) -> dict[str, float]:
    if "final_mean" in result:
        return dict(result["final_mean"])
    last = result["per_round"][-1]
    return {k: last[k] for k in ("gold_accuracy", "gold_category_accuracy", "gold_loss")}


def _curves(data: dict[str, Any], key: str) -> dict[str, list[tuple[float, float]]]:
    round0 = data["round0"][key]
    series: dict[str, list[tuple[float, float]]] = {}
    for name in sorted(data["algorithms"], key=_sort_key):
        result = data["algorithms"][name]
        if "per_round" in result:
            series[name] = [(0.0, round0)] + [
                (float(r["round"]), r[key]) for r in result["per_round"]
            ]
        else:  # local-only: scored after the last round only
            rounds = float(data["budget"]["rounds"])
            series["local (mean)"] = [(0.0, round0), (rounds, result["final_mean"][key])]
            series["local (worst)"] = [(0.0, round0), (rounds, result["final_worst"][key])]
    return series


def _table(data: dict[str, Any]) -> list[str]:
    meaning = data["metric_meaning"]
    # The ratio column reads the task's headline (ICD-10: the category), as the goals do.
    headline = headline_metric(data["task_settings"]["name"])
    lines = [
        f"| algorithm | gold: {meaning['gold_accuracy']} | gold: "
        f"{meaning['gold_category_accuracy']} | gold loss | rounds | bytes sent per site "
        f"(all rounds) | {meaning[headline]} vs centralized | share of centralized loss "
        "reduction |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    goals = data["goals"]
    rounds = data["budget"]["rounds"]
    for name in sorted(data["algorithms"], key=_sort_key):
        result = data["algorithms"][name]
        final = _final(result)
        goal = goals.get(name, {})
        if name == "local":
            worst = result["final_worst"]
            accuracy = f"{_pct(final['gold_accuracy'])} (worst {_pct(worst['gold_accuracy'])})"
            category = (
                f"{_pct(final['gold_category_accuracy'])} "
                f"(worst {_pct(worst['gold_category_accuracy'])})"
            )
            label = "local only (mean of sites)"
            loss = f"{final['gold_loss']:.3f} (worst {worst['gold_loss']:.3f})"
        else:
            accuracy, category = _pct(final["gold_accuracy"]), _pct(final["gold_category_accuracy"])
            label, loss = name, f"{final['gold_loss']:.3f}"
        sent = result.get("bytes_up_per_site", 0)
        sent_text = _mb(sent) if sent else "0"
        if name == "centralized":
            sent_text = f"0 (all {result['raw_record_bytes_moved_per_site']:,} B of records moved)"
        lines.append(
            f"| {label} | {accuracy} | {category} | {loss} | {rounds} | {sent_text} | "
            f"{_pct(goal.get(f'{headline}_vs_centralized'))} | "
            f"{_pct(goal.get('gold_loss_reduction_vs_centralized'))} |"
        )
    return lines


def _edge_table(data: dict[str, Any]) -> list[str]:
    edge = data.get("edge_cases") or {}
    if not edge:
        return []
    names = sorted((n for n in edge if n != "sizes"), key=_sort_key)
    lines = [
        "Edge cases (`fedsilo.data.icd10_edge`), each scored on its own: exact code "
        "(category) for the coded sets; for `empty` there is no right answer and the cell is "
        "the share of answers shaped like a code.",
        "",
        "| edge case | cases | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for kind, size in edge["sizes"].items():
        cells = []
        for name in names:
            score = edge[name][kind]
            if score["accuracy"] is None:
                cells.append(f"{_pct(score['code_shaped_rate'])} code-shaped")
            else:
                cells.append(f"{_pct(score['accuracy'])} ({_pct(score['category_accuracy'])})")
        lines.append(f"| {kind} | {size} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _goal_lines(data: dict[str, Any]) -> list[str]:
    """Each federated algorithm against the goals, led by the task's headline metric (ICD-10:
    category accuracy on unseen codes), with the other accuracy and the loss beside it."""
    headline = headline_metric(data["task_settings"]["name"])
    other = "gold_accuracy" if headline == "gold_category_accuracy" else "gold_category_accuracy"
    meaning = data["metric_meaning"]
    lines = []
    for name in sorted(data["goals"], key=_sort_key):
        row = data["goals"][name]
        ratio = row.get(f"{headline}_vs_centralized")
        if "centralized" not in data["algorithms"]:
            ratio_text = "undefined (centralized not run with this budget)"
        elif ratio is None:
            ratio_text = "undefined (centralized scored 0%)"
        else:
            verdict = "meets" if ratio >= GOAL_RATIO else "misses"
            ratio_text = (
                f"{_pct(ratio)} ({verdict} the 97% goal on this seed's point estimates; "
                f"{name} {_final_with_interval(data, name, headline)} against centralized "
                f"{_final_with_interval(data, 'centralized', headline)})"
            )
        above = row.get(f"{headline}_minus_local_mean")
        loss_gap = row.get("gold_loss_minus_local_mean")
        local_text = (
            ""
            if above is None
            else f"; {100 * above:+.1f} points ({'meets' if above >= LOCAL_MARGIN else 'misses'}"
            f" the +15 goal) and gold loss {loss_gap:+.3f} vs the local-only mean"
        )
        second = row.get(f"{other}_vs_centralized")
        share = row.get("gold_loss_reduction_vs_centralized")
        share_text = (
            "" if share is None else f"; {_pct(share)} of centralized's gold-loss reduction"
        )
        lines.append(
            f"- {name}: {meaning[headline]} vs centralized {ratio_text}{local_text}; "
            f"{meaning[other]} vs centralized {_pct(second) if second is not None else 'undefined'}"
            f"{share_text}."
        )
    algorithms = data["algorithms"]
    if "fedavg" in algorithms:
        base = _final(algorithms["fedavg"])
        for name in sorted(algorithms, key=_sort_key):
            if not name.startswith(("fedprox", "ffa-lora")):
                continue
            final = _final(algorithms[name])
            loss_change = final["gold_loss"] - base["gold_loss"]
            lines.append(
                f"- {name} against fedavg: gold loss {loss_change:+.3f}, "
                f"accuracy {100 * (final['gold_accuracy'] - base['gold_accuracy']):+.1f} points, "
                "category "
                f"{100 * (final['gold_category_accuracy'] - base['gold_category_accuracy']):+.1f}"
                " points."
            )
    return lines


def _final_with_interval(data: dict[str, Any], algorithm: str, metric: str) -> str:
    """An algorithm's final ``metric`` with its bootstrap interval where the row holds one."""
    row = data["algorithms"][algorithm]["per_round"][-1]
    interval = row.get(f"{metric}_ci95")
    text = _pct(row[metric])
    return text if not interval else f"{text} [{_pct(interval[0])}, {_pct(interval[1])}]"


def _algorithm_note(data: dict[str, Any]) -> str:
    ran = data["algorithms"]
    budget = data["budget"]
    notes = []
    if any(name.startswith("fedprox") for name in ran):
        mus = sorted(float(name.removeprefix("fedprox-mu")) for name in ran if "fedprox" in name)
        notes.append(f"FedProx mu in {mus}")
    if budget.get("server_momentum"):
        notes.append(
            f"server momentum {budget['server_momentum']:g} (Nesterov) for FedAvg, FedProx and "
            "FFA-LoRA"
        )
    if "fedadam" in ran:
        notes.append(f"FedAdam server learning rate {budget['server_learning_rate']:g}")
    families = {"fedprox" if n.startswith("fedprox") else n for n in ran}
    missing = [family for family in ORDER if family not in families]
    if missing and data.get("complete") is False:
        # A run stopped part-way (resumable): what it lacks is not a choice made to save time.
        notes.append("incomplete: not run yet (`--resume` goes on): " + ", ".join(missing))
    elif missing:
        notes.append("not run here, to save time: " + ", ".join(missing))
    if data["task_settings"]["name"] == "icd10" and not data.get("edge_cases"):
        notes.append("no edge cases")
    return "".join(f", {note}" for note in notes)


def _seed_flag(data: dict[str, Any]) -> str:
    seed = data["budget"]["seed"]
    return f" --seed {seed}" if seed else ""


def _local_work(train: dict[str, Any]) -> str:
    """'N local steps' or 'E local epochs', and the schedule when it is not constant."""
    work = (
        f"{train['local_steps']} local steps"
        if train.get("local_steps")
        else f"{train['local_epochs']:g} local epochs"
    )
    schedule = train.get("lr_schedule", "constant")
    if schedule != "constant":
        work += f" ({schedule} learning rate, {train.get('warmup_rounds', 0)} warmup rounds)"
    return work


def _budget_cell(data: dict[str, Any]) -> str:
    """'S sites, R x W x B, N/site, gold G': what one summary row trained and was scored on."""
    budget, train = data["budget"], data["train"]
    work = (
        f"{train['local_steps']} steps"
        if train.get("local_steps")
        else f"{train['local_epochs']:g} epochs"
    )
    records = data["task_settings"].get("examples_per_site", budget.get("examples_per_site"))
    return (
        f"{data['task_settings']['num_sites']} sites, {budget['rounds']} x {work} x "
        f"{budget['batch_size']}, {records}/site, gold {data['gold_count']}"
    )


LONG_LOCAL = 16


def _local_steps(data: dict[str, Any]) -> int:
    return int(data["train"].get("local_steps") or 0)


def _steps_per_site(data: dict[str, Any]) -> int | None:
    steps = _local_steps(data)
    return None if not steps else int(data["budget"]["rounds"]) * steps


def _same_work_lines(name: str, data: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    """For a run without its own centralized baseline: the same task, seed, sites and records
    trained for the same optimizer steps per site split into other rounds, when one was run, so
    that the split (local drift) is read against a baseline that saw the same examples."""
    if "centralized" in data["algorithms"] or _steps_per_site(data) is None:
        return []

    def shape(d: dict[str, Any]) -> tuple[Any, ...]:
        budget = d["budget"]
        return (
            d["task"],
            d["model"],
            budget["seed"],
            budget["num_sites"],
            budget["examples_per_site"],
            budget["batch_size"],
            d["gold_count"],
            _steps_per_site(d),
        )

    references = [
        (other, d)
        for other, d in loaded.items()
        if other != name and "centralized" in d["algorithms"] and shape(d) == shape(data)
    ]
    if not references:
        return []
    other, reference = references[0]
    headline = headline_metric(data["task_settings"]["name"])
    central = _final(reference["algorithms"]["centralized"])[headline]
    here = "; ".join(
        f"{algorithm} {_pct(_final(result)[headline])} ({_pct(_final(result)[headline] / central)}"
        " of that centralized)"
        for algorithm, result in sorted(data["algorithms"].items(), key=lambda i: _sort_key(i[0]))
    )
    there = ", ".join(
        f"{algorithm} {_pct(_final(result)[headline])}"
        for algorithm, result in sorted(
            reference["algorithms"].items(), key=lambda i: _sort_key(i[0])
        )
        if algorithm != "local"
    )
    return [
        f"The same seed, sites and records for the same {_steps_per_site(data)} optimizer steps "
        f"per site, split into {reference['budget']['rounds']} rounds of "
        f"{_local_work(reference['train'])} (`{other}`): {there}. Here, in "
        f"{data['budget']['rounds']} rounds of {_local_work(data['train'])}: {here}.",
        "",
    ]


def _task_section(
    name: str, data: dict[str, Any], loaded: dict[str, Any] | None = None
) -> list[str]:
    budget, train = data["budget"], data["train"]
    settings = data["task_settings"]
    split = (
        f"Dirichlet(alpha={settings['alpha']:g}) over chapters"
        if settings.get("partition") == "dirichlet" and settings["name"] == "icd10"
        else {"icd10": "one specialty (chapter) per site", "drug-review": "clinics by condition",
              "shakespeare": "one site per (play, role)"}[settings["name"]]
    )  # fmt: skip
    accuracy = _write_svg(
        f"quality-{name}-accuracy.svg",
        line_chart(
            _curves(data, "gold_accuracy"),
            title=f"{name}: gold accuracy by round",
            x_label="round",
            y_label="gold accuracy",
            y_min=0.0,
            y_max=1.0,
        ),
    )
    loss = _write_svg(
        f"quality-{name}-loss.svg",
        line_chart(
            _curves(data, "gold_loss"),
            title=f"{name}: gold loss by round",
            x_label="round",
            y_label="gold loss (answer tokens)",
        ),
    )
    return [
        f"### `{name}`",
        "",
        f"`fedsilo bench quality --task {data['task']} --model {data['model']}{_seed_flag(data)}` "
        f"with {budget['num_sites']} "
        f"sites ({split}), {budget['rounds']} rounds of {_local_work(train)} of "
        f"{train['batch_size']} examples (learning rate {train['learning_rate']:g}, max length "
        f"{train['max_length']}), {budget['examples_per_site']} examples per site, LoRA rank "
        f"{data['lora']['rank']}{_algorithm_note(data)}. Gold set: {data['gold_count']} "
        f"held-out records. Untrained: gold accuracy {_pct(data['round0']['gold_accuracy'])}, "
        f"loss {data['round0']['gold_loss']:.3f}.",
        "",
        *_table(data),
        "",
        "Against the goals (federated >= 97% of centralized; clearly above local-only):",
        "",
        *(_goal_lines(data) or ["- none yet: no federated algorithm has run."]),
        "",
        *_same_work_lines(name, data, loaded or {}),
        f"![gold accuracy by round]({accuracy})",
        f"![gold loss by round]({loss})",
        "",
        *_edge_table(data),
        f"Measured {data['measured_at']} in {data['wall_seconds'] / 60:.0f} min"
        f"{_parts_text(data)} on {data['machine']['cpus']} shared CPU cores (1 torch thread); "
        f"source: `benchmarks/results/quality-{name}.json`.",
        "",
    ]


def _parts_text(data: dict[str, Any]) -> str:
    """How a results file folded from parallel processes (`fedsilo bench merge`) was measured."""
    parts = data.get("merged_from") or []
    if len(parts) < 2:
        return ""
    each = "; ".join(", ".join(part["algorithms"]) for part in parts)
    text = f" of compute in {len(parts)} processes ({each})"
    if data.get("round0_differs"):
        starts = ", ".join(
            f"{', '.join(part['algorithms'])} {part['round0']['gold_loss']:.3f}"
            for part in parts
            if part.get("round0")
        )
        text += (
            f", on different CPUs whose bf16 kernels score the untrained adapter differently "
            f"(untrained gold loss: {starts})"
        )
    return text


def _alpha_chart(loaded: dict[str, dict[str, Any]]) -> list[str]:
    points: dict[str, list[tuple[float, float]]] = {}
    accuracy_points: dict[str, list[tuple[float, float]]] = {}
    # One point per Dirichlet-split ICD-10 file, whatever its name (seed repeats included).
    dirichlet = {
        task: float(data["task_settings"]["alpha"])
        for task, data in loaded.items()
        if data["task_settings"].get("partition") == "dirichlet"
    }
    for task, alpha in sorted(dirichlet.items(), key=lambda item: item[1]):
        data = loaded[task]
        for name, row in sorted(data["goals"].items(), key=lambda item: _sort_key(item[0])):
            share = row.get("gold_loss_reduction_vs_centralized")
            if share is not None:
                points.setdefault(name, []).append((math.log10(alpha), share))
            ratio = row.get("gold_accuracy_vs_centralized")
            if ratio is not None:
                accuracy_points.setdefault(name, []).append((math.log10(alpha), ratio))
    if not points:
        return []
    # How noisy these small runs are: training only lowers the train loss, so a rise of the
    # gold loss from one round to the next is evaluation and optimisation noise.
    rises = [
        later["gold_loss"] - earlier["gold_loss"]
        for task in dirichlet
        for result in loaded[task]["algorithms"].values()
        if "per_round" in result
        for earlier, later in zip(result["per_round"], result["per_round"][1:], strict=False)
    ]
    image = _write_svg(
        "quality-ratio-vs-alpha.svg",
        line_chart(
            points,
            title="federated / centralized vs Dirichlet alpha (ICD-10)",
            x_label="log10 alpha (-1 = very non-IID, 1 = nearly IID)",
            y_label="share of centralized loss reduction",
        ),
    )
    lines = [
        "### Federated / centralized against non-IID-ness",
        "",
        "Share of the centralized baseline's gold-loss reduction (from the untrained adapter) "
        "that each federated algorithm reaches, for each ICD-10 Dirichlet alpha that was run "
        "(1.0 = as good as pooling the data). Caution: in these runs the gold loss rose by up "
        f"to {max(rises, default=0.0):.3f} from one round to the next, so gaps smaller than "
        "that are within the noise of these runs.",
        "",
        f"![ratio vs alpha]({image})",
        "",
    ]
    if accuracy_points:
        image = _write_svg(
            "quality-accuracy-ratio-vs-alpha.svg",
            line_chart(
                accuracy_points,
                title="gold accuracy: federated / centralized vs alpha",
                x_label="log10 alpha",
                y_label="accuracy ratio",
            ),
        )
        lines += [f"![accuracy ratio vs alpha]({image})", ""]
    else:
        lines += [
            "The accuracy ratio is undefined in every run: centralized training scored 0% "
            "exact codes on the gold set.",
            "",
        ]
    return lines


def _family_cell(data: dict[str, Any], family: str, key: str) -> str:
    """``key`` of the family's final adapter (FedProx: the mu chosen on validation, else the
    first mu run, never one picked by its gold score)."""
    algorithms = data["algorithms"]
    names = [n for n in algorithms if n == family or n.startswith(f"{family}-mu")]
    if not names:
        return "not run"
    chosen_mu = (data.get("hyperparameters") or {}).get("chosen", {}).get("proximal_mu")
    chosen = f"fedprox-mu{chosen_mu:g}" if chosen_mu is not None else None
    best: str = chosen if chosen is not None and chosen in names else names[0]
    tuned = "" if chosen in names else ", not tuned"
    suffix = f" (mu {best.removeprefix('fedprox-mu')}{tuned})" if family == "fedprox" else ""
    if key == "headline":
        headline = headline_metric(data["task_settings"]["name"])
        return _pct(_final(algorithms[best])[headline]) + suffix
    if family == "centralized":
        return "100%"
    if family == "local":
        base, local = data["round0"]["gold_loss"], _final(algorithms["local"])["gold_loss"]
        central = _final(algorithms["centralized"])["gold_loss"]
        return _pct((base - local) / (base - central)) if base != central else "-"
    return _pct(data["goals"].get(best, {}).get("gold_loss_reduction_vs_centralized")) + suffix


def _goal_summary(loaded: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's three goals, read off every task that ran them (FedAvg unless named)."""
    ratios, above = [], []
    for name, data in loaded.items():
        key = f"{headline_metric(data['task_settings']['name'])}_vs_centralized"
        fedavg = data["goals"].get("fedavg", {})
        ratio = fedavg.get(key)
        best = max(
            (
                (row[key], algorithm)
                for algorithm, row in data["goals"].items()
                if row.get(key) is not None
            ),
            default=None,
        )
        sites = f"{data['task_settings']['num_sites']} sites"
        if ratio is not None and best is not None:
            ratios.append(f"`{name}` ({sites}) {_pct(ratio)} (best {best[1]} {_pct(best[0])})")
        elif "gold_loss_reduction_vs_centralized" in fedavg:
            ratios.append(
                f"`{name}` undefined, centralized scored 0% (loss: "
                f"{_pct(fedavg['gold_loss_reduction_vs_centralized'])} of its reduction)"
            )
        gap = fedavg.get("gold_loss_minus_local_mean")
        points = fedavg.get(f"{headline_metric(data['task_settings']['name'])}_minus_local_mean")
        if points is not None:
            verdict = "meets" if points >= LOCAL_MARGIN else "misses"
            above.append(f"`{name}` {100 * points:+.1f} points ({verdict}; gold loss {gap:+.3f})")
        elif gap is not None:
            above.append(f"`{name}` gold loss {gap:+.3f}")
    lines = ["Against the issue's goals (FedAvg unless named; the goals ask for 8 sites):", ""]
    families = _families_over_seeds()
    if families:
        lines.append(
            "- >= 97% of centralized, read on the mean over seeds where a task ran several "
            "(quality-summary.json: mean of the seeds both ran over centralized's mean): "
            + "; ".join(families)
            + "."
        )
    if ratios:
        lines.append(
            "- >= 97% of centralized on the headline, per results file (one seed each: "
            "ICD-10: category accuracy on unseen codes; the others: gold accuracy): "
            + "; ".join(ratios)
            + "."
        )
    if above:
        lines.append(
            "- >= 15 points above the local-only mean on the headline (FedAvg; with its gold "
            "loss minus the local-only mean, negative is better): " + "; ".join(above) + "."
        )
    runs = []
    for name, data in loaded.items():
        if data["task"] != "icd10-alpha0.1" or "fedavg" not in data["algorithms"]:
            continue
        base = _final(data["algorithms"]["fedavg"])["gold_loss"]
        changes = [
            f"{algorithm} {_final(result)['gold_loss'] - base:+.3f}"
            for algorithm, result in sorted(data["algorithms"].items())
            if algorithm.startswith(("fedprox", "ffa-lora"))
        ]
        if changes:  # a run of FedAvg alone (and centralized) has nothing to compare
            runs.append(f"`{name}` " + ", ".join(changes))
    if runs:
        lines.append(
            "- FedProx or FFA-LoRA better than FedAvg at alpha 0.1 (gold loss against "
            "FedAvg's; negative is better): " + "; ".join(runs) + "."
        )
    return [*lines, ""]


def _families_over_seeds() -> list[str]:
    """Each task of quality-summary.json run with two seeds or more: FedAvg's (and the best
    federated algorithm's) ratio of means to centralized, with the seeds it rests on."""
    path = RESULTS / "quality-summary.json"
    if not path.exists():
        return []
    readings = []
    for task, entry in json.loads(path.read_text()).get("tasks", {}).items():
        algorithms = entry["algorithms"]
        federated = {
            name: row
            for name, row in algorithms.items()
            if name not in ("centralized", "local-mean", "local-worst")
            and len(row["seeds"]) >= 2
            and row.get("ratio_to_centralized") is not None
        }
        if "fedavg" not in federated:
            continue
        fedavg = federated["fedavg"]
        verdict = "meets" if fedavg["ratio_to_centralized"] >= GOAL_RATIO else "misses"
        best = max(federated, key=lambda name: federated[name]["ratio_to_centralized"])
        seeds = ", ".join(str(seed) for seed in fedavg["seeds"])
        readings.append(
            f"`{task}` (seeds {seeds}) {_pct(fedavg['ratio_to_centralized'])}, {verdict} the "
            f"goal (best {best} {_pct(federated[best]['ratio_to_centralized'])})"
        )
    return readings


def _summary(loaded: dict[str, dict[str, Any]]) -> list[str]:
    """One row per task: every algorithm's final headline accuracy with the budget it trained
    on, then its share of the loss drop."""
    header = "| task | headline | budget | " + " | ".join(ORDER) + " |"
    rule = "|---|---|---|" + "---:|" * len(ORDER)
    accuracy = [header, rule]
    loss_header = "| task | untrained gold loss | " + " | ".join(ORDER) + " |"
    loss_share = [loss_header, "|---|---|" + "---:|" * len(ORDER)]
    for name, data in loaded.items():
        if "centralized" not in data["algorithms"]:
            continue
        headline = data["metric_meaning"][headline_metric(data["task_settings"]["name"])]
        cells = [_family_cell(data, family, "headline") for family in ORDER]
        accuracy.append(
            f"| `{name}` | {headline} | {_budget_cell(data)} | " + " | ".join(cells) + " |"
        )
        cells = [_family_cell(data, family, "loss_share") for family in ORDER]
        loss_share.append(
            f"| `{name}` | {data['round0']['gold_loss']:.3f} | " + " | ".join(cells) + " |"
        )
    moves = sorted(
        abs(rows[-1]["gold_loss"] - rows[-2]["gold_loss"])
        for data in loaded.values()
        for name, result in data["algorithms"].items()
        if name != "centralized" and len(rows := result.get("per_round", [])) >= 2
    )
    gold = "/".join(str(n) for n in sorted({d["gold_count"] for d in loaded.values()}))
    rounds = "/".join(str(n) for n in sorted({d["budget"]["rounds"] for d in loaded.values()}))
    per_record = {d["gold_count"] for d in loaded.values() if d["metric"] != "next-token"}
    step = "/".join(f"{100 / n:.1f}" for n in sorted(per_record))
    seeds = (
        " The `-seed` rows repeat a task with another seed (other draws of the sites' records, "
        "the gold set and the initial adapter)."
        if any("-seed" in name for name in loaded)
        else ""
    )
    noise = (
        [
            "How far apart two results must be to mean something: between its last two rounds "
            f"the gold loss of a federated run moved by {moves[len(moves) // 2]:.3f} (median) "
            f"and up to {moves[-1]:.3f}, over {len(moves)} runs. Differences between "
            "algorithms smaller than that are within the round-to-round noise of this budget "
            f"({gold} gold records, {rounds} rounds). Per-record accuracy (codes, sentiment) "
            f"moves in steps of one gold record: {step} points; next-token accuracy counts "
            f"tokens, so its steps are finer.{seeds}",
            "",
        ]
        if moves
        else []
    )
    return [
        "### Summary",
        "",
        "Final accuracy on each task's headline (ICD-10: category accuracy on gold part a, "
        "unseen codes of trained categories; the others: gold accuracy), with the budget each "
        "row trained on (sites, rounds x local work x batch, records per site, gold records; "
        "local: the mean of the sites; FedProx: the mu chosen on the validation split, else "
        "the first of its grid):",
        "",
        *accuracy,
        "",
        "Share of centralized training's gold-loss reduction (untrained loss minus final loss, "
        "over the same for centralized), the readable comparison where exact answers are still "
        "0% at this budget:",
        "",
        *loss_share,
        "",
        *noise,
        *_goal_summary(loaded),
    ]


def quality_sections() -> list[str]:
    """The `fedsilo bench quality` section: one subsection per results file, then the alpha plot."""
    lines = ["## Federated vs centralized vs local-only (`fedsilo bench quality`)", ""]
    files = sorted(
        path
        for path in RESULTS.glob("quality-*.json")
        if path.name != "quality-summary.json" and not path.stem.endswith("-sweep")
    )
    if not files:
        return [*lines, "Not measured yet: run `fedsilo bench quality --task T`.", ""]
    # A task's runs with other seeds (quality-T-seedN.json) follow the task's own.
    files.sort(key=lambda path: path.stem.partition("-seed"))
    loaded = {path.stem.removeprefix("quality-"): json.loads(path.read_text()) for path in files}
    fewest = min(min(d["sites"].values()) for d in loaded.values())
    shortest = min(d["budget"]["rounds"] for d in loaded.values())
    least_gold = min(d["gold_count"] for d in loaded.values())
    # Local drift needs many local steps: FedProx is read on the runs with at least 16.
    many = {_local_work(d["train"]) for d in loaded.values() if _local_steps(d) >= LONG_LOCAL}
    short_steps = "/".join(sorted({_local_work(d["train"]) for d in loaded.values()} - many))
    long_steps = "/".join(sorted(many))
    lines += [
        "Every algorithm gets the same budget: centralized trains on all sites' examples pooled "
        "(rounds x sites x local steps optimizer steps, so the same examples and steps as the "
        "federation); local-only trains each site alone for the steps it spends in the "
        "federation and is scored after the last round (mean and worst site); the federated "
        "runs are the real ServerApp and ClientApp simulated in-process. Bytes sent per site "
        "count the adapter updates a site uploads over all rounds. Budgets differ by task "
        f"(the summary's budget column); every file here trains at least {fewest} records per "
        f"site for {shortest} rounds or more and scores at least {least_gold} gold records. "
        "Runs at a smoke budget "
        "(16 records per site, 3 rounds, 24 gold records: every algorithm at 0% on ICD-10) were "
        "removed from this page: they could not tell the algorithms apart. FedProx corrects the "
        "drift of many local steps; at "
        f"{short_steps} per round its proximal term has little to act on (its gradient is zero "
        "at a round's first step), so those budgets cannot show what it is for"
        + (f"; the runs with {long_steps} per round are the ones that can." if long_steps else "."),
        "",
    ]
    missing = sorted(set(TASK_PRESETS) - {data["task"] for data in loaded.values()})
    if missing:
        lines += [
            "Not run yet (no results file): " + ", ".join(f"`{name}`" for name in missing) + ".",
            "",
        ]
    lines += _summary(loaded)
    lines += seed_summary_section()
    for name, data in loaded.items():
        lines += _task_section(name, data, loaded)
    lines += _alpha_chart(loaded)
    return lines


def _interval(entry: dict[str, Any]) -> str:
    interval = entry.get("ci95")
    return "-" if interval is None else f"[{_pct(interval[0])}, {_pct(interval[1])}]"


def seed_summary_section() -> list[str]:
    """Mean and 95% interval over seeds per task and algorithm, with mean learning curves,
    from benchmarks/results/quality-summary.json (written by `fedsilo bench quality --seeds`)."""
    path = RESULTS / "quality-summary.json"
    if not path.exists():
        return []
    summary = json.loads(path.read_text())
    lines = ["### Over seeds (`benchmarks/results/quality-summary.json`)", ""]
    for task, entry in summary.get("tasks", {}).items():
        algorithms = entry["algorithms"]
        names = sorted(
            algorithms, key=lambda n: _sort_key(n.removesuffix("-mean").removesuffix("-worst"))
        )
        lines += [
            f"`{task}`: {entry['headline']} ({entry['headline_meaning']}); {entry['interval']}. "
            f"Ratio to centralized: {entry['ratio_to_centralized']} (an algorithm run with fewer "
            "seeds than centralized is compared with centralized on its own seeds only).",
            "",
            "| algorithm | seeds | mean | 95% interval | ratio to centralized |",
            "|---|---|---:|---:|---:|",
        ]
        for name in names:
            row = algorithms[name]
            lines.append(
                f"| {name} | {', '.join(str(s) for s in row['seeds'])} | {_pct(row['mean'])} | "
                f"{_interval(row)} | {_pct(row['ratio_to_centralized'])} |"
            )
        curves = {
            name: [(float(r), float(v)) for r, v in algorithms[name]["curve_mean"]]
            for name in names
            if algorithms[name].get("curve_mean")
        }
        if curves:
            image = _write_svg(
                f"quality-{task}-curves-over-seeds.svg",
                line_chart(
                    curves,
                    title=f"{task}: {entry['headline']} by round (mean over seeds)",
                    x_label="round",
                    y_label=entry["headline"],
                    y_min=0.0,
                    y_max=1.0,
                ),
            )
            lines += ["", f"![learning curves of {task}]({image})"]
        if entry.get("skipped_files"):
            lines += ["", "Left out (another budget): " + ", ".join(entry["skipped_files"])]
        lines.append("")
    return lines


def scale_section() -> list[str]:
    """The scale run's table."""
    lines = ["## Scale: 10, 30 and 100 simulated sites", ""]
    path = RESULTS / "scale.json"
    if not path.exists():
        return [*lines, "Not measured yet: run `python benchmarks/scale.py`.", ""]
    data = json.loads(path.read_text())
    lines += [
        f"`python benchmarks/scale.py`: {data['model']} (adapter {data['adapter_mb']:.2f} MB), "
        f"{data['rounds']} rounds of {data['local_steps']} local step(s) per site, all sites in "
        "one process on one torch thread (in-process grid), every site training in turn. Memory "
        "is the process's resident set, sampled every 5 ms; sites share the process, so its "
        "growth with the number of sites is what the coordinator holds for a round.",
        "",
        "| sites | seconds per round | resident before round 1 | peak during rounds | growth "
        "| adapter bytes sent per round |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for run in data["runs"]:
        seconds = ", ".join(f"{s:.1f}" for s in run["round_seconds"])
        lines.append(
            f"| {run['sites']} | {seconds} | {run['rss_before_rounds_mb']:.0f} MB | "
            f"{run['peak_rss_during_rounds_mb']:.0f} MB | {run['growth_during_rounds_mb']:.0f} MB "
            f"| {_mb(run['bytes_up_per_round'])} |"
        )
    per_site = data["growth_per_extra_site_mb"]
    copies = per_site / data["adapter_mb"]
    if copies < 0.5:
        shape = "about flat, within the goal of sites x adapter"
    elif copies <= 1.0:
        shape = "linear in the sites of a round, within the goal of sites x adapter"
    else:
        shape = (
            f"linear in the sites of a round, {copies:.1f} times the goal's bound of "
            "sites x adapter (and not flat)"
        )
    lines += [
        "",
        f"Peak memory grows by {per_site:.2f} MB per extra site, {copies:.1f} times the adapter: "
        f"{shape}. The coordinator builds the global adapter's record once per round and every "
        "site's message shares it, and it folds each accepted update into the round's float64 "
        "sum as the reply arrives, then lets the reply go (`UpdateSum` in "
        "`src/fedsilo/server/strategies.py`; `tests/simulation/test_streaming_aggregation.py` "
        "checks that no earlier reply is alive while the next site trains). What still grows is "
        "small per-site state: ledger entries, tasks and metrics, and the simulated sites' own "
        "state, which shares the process.",
        "",
        f"Measured {data['measured_at']} on {data['machine']['cpus']} CPU cores, {data['note']}; "
        "source: `benchmarks/results/scale.json`.",
        "",
    ]
    return lines
