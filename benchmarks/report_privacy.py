"""The privacy sections of docs/benchmarks.md: attacks, and privacy against utility."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedsilo.bench.dp_recipe import training_recipe
from fedsilo.config.schema import DEFAULT_TARGET_MODULES
from fedsilo.protocol.schedule import local_steps_for

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%" if value < 0.01 else f"{100 * value:.1f}%"


def attack_section(results: dict[str, dict[str, Any]]) -> list[str]:
    """The attack tables, one per results file (by file name)."""
    lines = ["## Privacy attacks: canary exposure and membership inference", ""]
    if not results:
        return [*lines, "Not measured yet: run `python benchmarks/privacy_attacks.py`.", ""]
    lines += [
        "`python benchmarks/privacy_attacks.py --model M`: a federation of hospitals by "
        "specialty; canaries planted several times in one site's records and as many never "
        "planted; exposure ranks each secret among random ones (about 1.44 bits expected by "
        "chance); the p-value is the chance that secrets the model never saw reach the group's "
        "total exposure (Fisher's method; small means memorised); membership AUC separates that "
        "site's records from held-out records of its specialty (0.5 = no signal). Goal: without "
        "DP the planted canaries are exposed, with DP at epsilon <= 8 they look like "
        "never-planted ones.",
        "",
    ]
    for name, result in results.items():
        settings = result["settings"]
        measured = result["results"]
        max_exposure = next(iter(measured.values()))["max_exposure"]
        lines += [
            f"**`{settings['model']}`**: {_attack_training(result)}; "
            f"{settings['canaries']} canaries planted {settings['repeats']} times each, "
            f"{settings['candidates']} candidates (maximum exposure {max_exposure:.2f} bits).",
            "",
            "| training | epsilon per site | planted exposure (bits) | p-value | "
            "never-planted exposure | p-value | membership AUC | gold loss, category accuracy |",
            "|---|---|---|---:|---|---:|---:|---|",
        ]
        for setting, label in (("no_dp", "no DP"), ("record_dp", "record-level DP-SGD")):
            row = measured.get(setting)
            if row is None:
                lines.append(f"| {label} | not measured yet | | | | | | |")
                continue
            epsilon = row["epsilon"]
            eps_text = (
                "unbounded" if not epsilon else ", ".join(f"{v:.2f}" for v in epsilon.values())
            )
            planted = ", ".join(f"{v:.2f}" for v in row["planted_exposure"])
            never = ", ".join(f"{v:.2f}" for v in row["never_inserted_exposure"])
            lines.append(
                f"| {label} | {eps_text} | {planted} | {_p(row.get('planted_p_value'))} | "
                f"{never} | {_p(row.get('never_inserted_p_value'))} | "
                f"{row['membership_auc']:.3f}{_auc_interval(row)} | {_attacked_model(row)} |"
            )
        lines += [
            "",
            f"Measured {result['measured_at']} on {result['machine']['cpus']} CPU cores; "
            f"source: `benchmarks/results/{name}`.",
            "",
        ]
    return lines


def _attacked_model(row: dict[str, Any]) -> str:
    """The attacked model's gold loss and, where recorded, category accuracy on gold."""
    text = f"{row['gold_loss']:.3f}"
    accuracy = row.get("gold_category_accuracy")
    if accuracy is None:
        return text
    interval = row.get("gold_category_accuracy_ci95")
    text += f", {accuracy:.1%}"
    return text + (f" [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else "")


def _attack_training(result: dict[str, Any], reference: dict[str, Any] | None = None) -> str:
    """How the attacked federation trained, in words; with ``reference`` (the recipe the
    accuracy rows beside it were trained with), whether it is that recipe."""
    settings, recipe = result["settings"], result.get("recipe")
    sites = settings.get("sites", 3)
    if recipe is None:
        return (
            f"{sites} sites of {settings['examples']} records, {settings['rounds']} rounds of "
            f"{settings['steps']} local steps of {settings['batch_size']}"
        )
    steps = _steps_per_round(recipe, settings["records_per_site"])
    same = ""
    if reference is not None:
        same = (
            " (the recipe of the accuracy rows above)"
            if training_recipe(recipe) == training_recipe(reference)
            else " (not the recipe of the accuracy rows above)"
        )
    return (
        f"{sites} sites of {settings['records_per_site']:,} records, {recipe['rounds']} rounds "
        f"of {steps} steps of batch {recipe['expected_batch_size']} (Poisson-sampled, of that "
        f"expected size, under DP), {recipe['lr_schedule']} learning rate "
        f"{recipe['learning_rate']:g}, {_adapter(recipe)}{same}; membership: "
        f"{settings['held_out']} of the first site's training records against as many of its "
        "records held out"
    )


def _steps_per_round(recipe: dict[str, Any], records: int, *, batch: int | None = None) -> int:
    """A site's steps per round under ``recipe`` (its expected batch unless ``batch`` is given)."""
    return local_steps_for(
        local_steps=0,
        local_epochs=recipe["local_epochs"],
        batch_size=recipe["expected_batch_size"] if batch is None else batch,
        num_examples=records,
    )


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2g}"


_UTILITY_LABELS = {
    "no_dp": "no DP (epsilon = inf)",
    "eps8": "record-level DP-SGD, target epsilon 8",
    "eps3": "record-level DP-SGD, target epsilon 3",
    "eps1": "record-level DP-SGD, target epsilon 1",
    "site_level": "site-level DP (clip 1, noise multiplier 1)",
}
UTILITY_PLOT = DOCS / "img" / "privacy-utility.svg"


def _utility_epsilon(row: dict[str, Any]) -> str:
    if row.get("epsilon"):
        values = row["epsilon"].values()
        return f"{max(values):.2f} (largest of {len(row['epsilon'])} sites)"
    if row.get("site_level_epsilon") is not None:
        return f"{row['site_level_epsilon']:.2f} (per site's whole data)"
    return "unbounded"


def _utility_plot(result: dict[str, Any]) -> None:
    from fedsilo.report.svg import line_chart

    series = {
        _UTILITY_LABELS.get(name, name): [
            (float(r["round"]), float(r["gold_loss"])) for r in row["per_round"]
        ]
        for name, row in result["settings"].items()
    }
    chart = line_chart(
        series,
        title="Gold loss per round at each privacy setting",
        x_label="round",
        y_label="gold loss (mean answer-token loss)",
        width=820,
    )
    UTILITY_PLOT.parent.mkdir(parents=True, exist_ok=True)
    UTILITY_PLOT.write_text(chart + "\n", encoding="utf-8")


def _interval(ci95: list[float] | None) -> str:
    return "-" if ci95 is None else f"{_pct(ci95[0])} to {_pct(ci95[1])}"


def _rows_plot(rows: list[dict[str, Any]]) -> None:
    from fedsilo.report.svg import line_chart

    private = sorted((r for r in rows if r["epsilon"] is not None), key=lambda r: r["epsilon"])
    series: dict[str, list[tuple[float, float]]] = {
        "record-level DP-SGD": [(float(r["epsilon"]), r["accuracy"]) for r in private]
    }
    for row in rows:
        if row["epsilon"] is None and private:
            ends = (float(private[0]["epsilon"]), float(private[-1]["epsilon"]))
            series["no DP"] = [(x, row["accuracy"]) for x in ends]
    chart = line_chart(
        series,
        title="Headline accuracy against record-level epsilon",
        x_label="epsilon (whole run, per site)",
        y_label="category accuracy, unseen codes",
        y_min=0.0,
        y_max=1.0,
        width=820,
    )
    UTILITY_PLOT.parent.mkdir(parents=True, exist_ok=True)
    UTILITY_PLOT.write_text(chart + "\n", encoding="utf-8")


def sweep_section(sweeps: dict[str, dict[str, Any]]) -> list[str]:
    """The DP sweeps' points (benchmarks/dp_sweep.py), one table over all sweep files.

    ``sweeps`` maps each results file's name to its content. Points of files with the same
    schedule and epsilon are comparable; the one with the lowest validation loss among them
    is marked, since that is what the privacy/utility run takes (``--from-sweep`` its file).
    """
    lines = ["## Choosing the DP recipe on validation data", ""]
    if not sweeps:
        return [*lines, "Not measured yet: run `python benchmarks/dp_sweep.py`.", ""]
    lines += [
        "`python benchmarks/dp_sweep.py`: every point trains the ICD-10 federation with "
        "record-level DP at one target epsilon for the whole run and is scored on a validation "
        "split of the sites' own records (the gold set is never scored here). Validation loss "
        "is the mean answer-token cross-entropy after the last round; **bold**: the lowest "
        "among the points of the same schedule and epsilon.",
        "",
        "| file | sites x records | epsilon | schedule | adapter | batch | steps/round | clip "
        "| learning rate | validation loss by round | validation category | minutes |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]

    def schedule(result: dict[str, Any]) -> str:
        recipe = result["recipe"]
        epochs = recipe["local_epochs"]
        shape = f"{recipe['rounds']} rounds x {epochs:g} epoch{'' if epochs == 1 else 's'}"
        if recipe.get("lr_schedule", "constant") != "constant":
            shape += f", {recipe['lr_schedule']}"
        if recipe.get("server_momentum"):
            shape += f", momentum {recipe['server_momentum']:g}"
        return shape

    best: dict[tuple[str, Any], float] = {}
    for result in sweeps.values():
        group = (schedule(result), result["epsilon"])
        for point in result["points"]:
            best[group] = min(best.get(group, math.inf), point["validation_loss"])
    for name, result in sorted(sweeps.items()):
        recipe = result["recipe"]
        targets = recipe.get("lora_targets")
        adapter = f"{'FFA-LoRA' if recipe['ffa'] else 'LoRA'} r{recipe['lora_rank']}" + (
            ""
            if targets is None or set(targets) == set(DEFAULT_TARGET_MODULES)
            else f" on {', '.join(targets)}"
        )
        trained = result["records_per_site"] - round(
            result["records_per_site"] * result["validation_share"]
        )
        for point in sorted(
            result["points"], key=lambda p: (p["expected_batch_size"], p["learning_rate"])
        ):
            steps = _steps_per_round(recipe, trained, batch=point["expected_batch_size"])
            scored = point.get("scored_rounds") or range(len(point["validation_loss_per_round"]))
            losses = ", ".join(
                f"{round_}: {loss:.3f}"
                for round_, loss in zip(scored, point["validation_loss_per_round"], strict=True)
                if round_ > 0
            )
            loss = point["validation_loss"]
            if loss == best[(schedule(result), result["epsilon"])]:
                losses = f"**{losses}**"
            epsilon = "inf" if result["epsilon"] is None else f"{result['epsilon']:g}"
            lines.append(
                f"| `{name}` | {result['num_sites']} x {result['records_per_site']} | {epsilon} "
                f"| {schedule(result)} | {adapter} | {point['expected_batch_size']} | {steps} "
                f"| {point['clip']:g} | {point['learning_rate']:g} | {losses} "
                f"| {_pct(point['validation_category_accuracy'])} "
                f"| {point['seconds'] / 60:.1f} |"
            )
    return [
        *lines,
        "",
        "Validation loss by round: `round: loss` for the rounds scored. A sweep of one site "
        "stands in for a federation of sites of its size: it trains on its records less the "
        "validation share, so its sampling rate and steps (and the noise on each step) are "
        "close to, not equal to, a federation site's, and its records mix the federation's "
        "specialties. The choice of hyperparameters on the validation records is itself not "
        "accounted, as in the published recipes. Source: `benchmarks/results/dp-sweep*.json`.",
        "",
    ]


def latest_per_setting(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The most recently measured row of each setting."""
    return {
        row["setting"]: row for row in sorted(rows, key=lambda r: str(r.get("measured_at", "")))
    }


def reference_recipe(rows: list[dict[str, Any]], result: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe of the most accurate row without DP (the latest of equals): the goals ask how
    much of the best non-private model DP keeps, so a weaker recipe tried later does not become
    the reference its own DP rows are read against."""
    plain = [row for row in rows if row["setting"] == "no_dp"]
    if not plain:
        return None
    base = max(plain, key=lambda r: (r["accuracy"], str(r.get("measured_at", ""))))
    return training_recipe(_row_recipe(base, result))


def comparable_per_setting(
    rows: list[dict[str, Any]], result: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The row each goal is read on: per setting, the latest row trained with the recipe of
    the most accurate row without DP (the latest of any recipe while no row without DP exists). A
    share of the non-private accuracy compares two trainings of one recipe, never two."""
    reference = reference_recipe(rows, result or {})
    if reference is None:
        return latest_per_setting(rows)
    same = [r for r in rows if training_recipe(_row_recipe(r, result or {})) == reference]
    return latest_per_setting(same)


def _recipe_text(recipe: dict[str, Any], records_per_site: int) -> str:
    """One sentence stating what a row's sites trained with."""
    steps = _steps_per_round(recipe, records_per_site)
    schedule = (
        f"{recipe['lr_schedule']} learning rate {recipe['learning_rate']:g}"
        + (f" after {recipe['warmup_rounds']} warmup rounds" if recipe.get("warmup_rounds") else "")
        + (
            f", server momentum {recipe['server_momentum']:g}"
            if recipe.get("server_momentum")
            else ""
        )
        if "lr_schedule" in recipe
        else f"constant learning rate {recipe['learning_rate']:g}"
    )
    return (
        f"{recipe['rounds']} rounds of {recipe['local_epochs']:g} local "
        f"epoch{'' if recipe['local_epochs'] == 1 else 's'} each "
        f"({steps} step{'' if steps == 1 else 's'}), expected "
        f"batch {recipe['expected_batch_size']} (Poisson sampling), {schedule}, clip "
        f"{recipe['max_grad_norm']:g}, {_adapter(recipe)}"
    )


def _adapter(recipe: dict[str, Any]) -> str:
    """The trained adapter: kind, rank and, where the recipe records them, the adapted layers."""
    targets = recipe.get("lora_targets")
    adapted = "" if targets is None else f" on {', '.join(targets)}"
    return f"{'FFA-LoRA' if recipe['ffa'] else 'LoRA'} rank {recipe['lora_rank']}{adapted}"


def _recipes(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows' distinct recipes, in the order the rows list them."""
    found: list[dict[str, Any]] = []
    for row in result["rows"]:
        recipe = _row_recipe(row, result)
        if recipe not in found:
            found.append(recipe)
    return found


def _row_recipe(row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A row's recipe (files written before rows carried one hold it at the top level)."""
    recipe: dict[str, Any] = row.get("recipe") or result.get("recipe") or {}
    return recipe


def _rows_section(result: dict[str, Any]) -> list[str]:
    """The table of benchmarks/privacy_utility.py's rows (one per epsilon and recipe)."""
    recipes = _recipes(result)

    def recipe_number(row: dict[str, Any]) -> int:
        return recipes.index(_row_recipe(row, result)) + 1

    chosen: dict[int, list[str]] = {}
    for row in result["rows"]:
        source = row.get("hyperparameters_from") or result.get("hyperparameters_from", "")
        sources = chosen.setdefault(recipe_number(row), [])
        if source not in sources:
            sources.append(source)
    lines = [
        "`python benchmarks/privacy_utility.py --resume`: "
        f"`{result['model']}`, {result['num_sites']} hospitals by specialty (ICD-10-CM "
        f"chapters {', '.join(result['chapters'])}), {result['records_per_site']} records each. "
        f"Headline: {result['headline']}. Goals: epsilon 8 keeps >= 90% and epsilon 3 >= 75% "
        "of the non-private accuracy, read on the latest row of each setting trained with the "
        "recipe of the most accurate row without DP.",
        "",
        *(
            f"- Recipe {number}: {_recipe_text(recipe, result['records_per_site'])}. "
            f"Hyperparameters from: {'; '.join(chosen[number])}."
            for number, recipe in enumerate(recipes, start=1)
        ),
        "",
        "| setting | recipe | epsilon | delta | accuracy | 95% CI | exact code | gold loss "
        "| share of non-private | minutes |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    # No DP first, then from the weakest guarantee to the strongest.
    rows = sorted(
        result["rows"], key=lambda r: -math.inf if r["epsilon"] is None else -r["epsilon"]
    )
    untrained = next((r for r in rows if r.get("accuracy_per_round")), None)
    if untrained is not None:
        lines.append(
            f"| base model, before training | - | - | - "
            f"| {_pct(untrained['accuracy_per_round'][0])} "
            f"| | | {untrained['gold_loss_per_round'][0]:.3f} | | |"
        )
    reference = reference_recipe(result["rows"], result)
    for row in rows:
        share = row.get("share_of_non_private")
        if reference is not None and training_recipe(_row_recipe(row, result)) != reference:
            share = None  # a share of another recipe's accuracy is no measurement
        lines.append(
            f"| {row['setting']} | {recipe_number(row)} | "
            f"{'inf' if row['epsilon'] is None else row['epsilon']} | "
            f"{'-' if row['delta'] is None else row['delta']} | {_pct(row['accuracy'])} | "
            f"{_interval(row['ci95'])} | {_pct(row['exact_code_accuracy'])} | "
            f"{row['gold_loss']:.3f} | {'-' if share is None else _pct(share)} | "
            f"{row['seconds'] / 60:.1f} |"
        )
    _rows_plot(list(comparable_per_setting(result["rows"], result).values()))
    return [
        *lines,
        "",
        rows_goal(rows, result),
        "",
        f"![accuracy against epsilon](img/{UTILITY_PLOT.name})",
        "",
        f"Measured on {result['machine']['cpus']} CPU cores, one torch thread; source: "
        "`benchmarks/results/privacy-utility.json`.",
        "",
    ]


def learned(no_dp: dict[str, Any]) -> bool:
    """Whether the non-private federation measurably learned (its interval excludes zero)."""
    ci95 = no_dp.get("ci95")
    return ci95 is not None and float(ci95[0]) > 0


UNREADABLE_SHARE = "not a measurement (the no-DP interval includes 0)"

GOALS = {"eps8": 0.90, "eps3": 0.75}
"""Share of the non-private headline accuracy each setting must keep (issue goals)."""


def _loss_reading(by_setting: dict[str, dict[str, Any]]) -> str:
    """Epsilon 8's share of the gold-loss reduction without DP: a secondary signal only."""
    base, eps8 = by_setting.get("no_dp"), by_setting.get("eps8")
    if base is None or eps8 is None or "gold_loss_per_round" not in base:
        return ""
    start = base["gold_loss_per_round"][0]
    gained = start - base["gold_loss"]
    if not gained > 0:
        return ""
    kept = (start - eps8["gold_loss"]) / gained
    return (
        f" By gold loss, a secondary signal and not the goal, epsilon 8 keeps {_pct(kept)} of "
        f"the reduction training without DP achieves ({start:.3f} before training, "
        f"{base['gold_loss']:.3f} without DP, {eps8['gold_loss']:.3f} at epsilon 8)."
    )


def rows_goal(rows: list[dict[str, Any]], result: dict[str, Any] | None = None) -> str:
    """The goals read from the rows, or why they cannot be read.

    A share of the non-private accuracy only means something when the non-private federation
    measurably learned: when its interval reaches 0, the ratio divides one noisy count by
    another and is not reported as a reading of the goal.
    """
    by_setting = comparable_per_setting(rows, result)
    base = by_setting.get("no_dp")
    if base is None:
        return "The goals cannot be read yet: the non-private setting is not measured."
    if not learned(base):
        return (
            f"**The goals cannot be read from this run**: without DP the federation reaches "
            f"{_pct(base['accuracy'])} ({_interval(base.get('ci95'))}) on the headline, an "
            "interval that includes zero, so a share of it is not a measurement. This recipe "
            "does not teach the headline even without DP; it must first be chosen so that the "
            "non-private federation learns (benchmarks/dp_sweep.py, on validation data)."
            + _loss_reading(by_setting)
        )
    readings = []
    for setting, goal in GOALS.items():
        row = by_setting.get(setting)
        if row is None:
            readings.append(f"{setting}: not measured")
            continue
        share = row["accuracy"] / base["accuracy"]
        verdict = "met" if share >= goal else "**not met**"
        readings.append(f"{setting} keeps {_pct(share)} (goal {_pct(goal)}): {verdict}")
    return "Goals: " + "; ".join(readings) + "."


def utility_section(result: dict[str, Any] | None) -> list[str]:
    lines = ["## Privacy and utility", ""]
    if result is None:
        return [*lines, "Not measured yet: run `python benchmarks/privacy_utility.py`.", ""]
    if "rows" in result:
        return [*lines, *_rows_section(result)]
    task, train = result["task"], result["train"]
    rows = result["settings"]
    lines += [
        "`python benchmarks/privacy_utility.py` runs the demo federation once per privacy "
        f"setting, everything else equal: `{result['model']}`, {task['num_sites']} hospitals "
        f"by specialty, {task['examples_per_site']} records each, {result['rounds']} rounds of "
        f"{train['local_steps']} local steps (batch {train['batch_size']}, learning rate "
        f"{train['learning_rate']}), gold set of {task['gold_size']} ICD-10-CM codes no site "
        "saw. Record-level targets are for the whole run, delta 1e-5, clip 1; each site "
        "calibrates its own noise. Goal: epsilon 8 keeps >= 90% of non-DP gold accuracy.",
        "",
        "| setting | epsilon | gold exact match | gold category | gold loss | minutes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in ("no_dp", "eps8", "eps3", "eps1", "site_level"):
        if name not in rows:
            lines.append(f"| {_UTILITY_LABELS[name]} | not measured | | | | |")
            continue
        row = rows[name]
        final = row["final"]
        lines.append(
            f"| {_UTILITY_LABELS[name]} | {_utility_epsilon(row)} | "
            f"{_pct(final['gold_accuracy'])} | {_pct(final['gold_category_accuracy'])} | "
            f"{final['gold_loss']:.3f} | {row['seconds'] / 60:.1f} |"
        )
    if "no_dp" in rows and "eps8" in rows:
        lines += ["", _utility_goal(rows["no_dp"], rows["eps8"])]
    _utility_plot(result)
    lines += [
        "",
        f"![gold loss per round](img/{UTILITY_PLOT.name})",
        "",
        f"Round 0 is the base model before training. Measured on {result['machine']['cpus']} "
        "CPU cores shared with other work (minutes are wall time, not comparable across rows); "
        "source: `benchmarks/results/privacy-utility.json`.",
        "",
    ]
    return lines


def _utility_goal(no_dp: dict[str, Any], eps8: dict[str, Any]) -> str:
    start = no_dp["per_round"][0]["gold_loss"]
    gained = start - no_dp["final"]["gold_loss"]
    kept = (start - eps8["final"]["gold_loss"]) / gained if gained > 0 else float("nan")
    reduction = (
        f"Epsilon 8 keeps {_pct(kept)} of the gold-loss reduction that training without DP "
        f"achieves ({start:.3f} before training, {no_dp['final']['gold_loss']:.3f} without DP, "
        f"{eps8['final']['gold_loss']:.3f} at epsilon 8)."
    )
    accuracy = no_dp["final"]["gold_accuracy"]
    if accuracy > 0:
        share = eps8["final"]["gold_accuracy"] / accuracy
        return f"{reduction} Of the non-DP exact-match accuracy it keeps {_pct(share)}."
    return (
        f"{reduction} The accuracy goal cannot be read here: without DP the model reaches "
        f"{_pct(accuracy)} exact match on codes it never saw in this budget, so the ratio is "
        "undefined, and the gold loss carries the comparison."
    )


COMPLIANCE_PAGE = DOCS / "privacy-for-compliance.md"
_COMPLIANCE_MARKERS = ("<!-- compliance-table -->", "<!-- end-compliance-table -->")
_NOT_MEASURED = "not measured yet"


def compliance_table(utility: dict[str, Any] | None, attacks: dict[str, Any] | None) -> list[str]:
    """The compliance page's tables: measured figures only, "not measured yet" elsewhere."""
    all_rows = (utility or {}).get("rows", [])
    rows = comparable_per_setting(all_rows, utility)
    reference = reference_recipe(all_rows, utility or {})
    readable = "no_dp" not in rows or learned(rows["no_dp"])
    lines = [
        "| record-level epsilon (delta) | headline accuracy (95% CI) | "
        "share of non-private accuracy |",
        "|---|---|---|",
    ]
    for epsilon in (1, 3, 8):
        row = rows.get(f"eps{epsilon}")
        if row is None:
            lines.append(f"| {epsilon} | {_NOT_MEASURED} | {_NOT_MEASURED} |")
            continue
        plain = rows.get("no_dp")
        # Read against the row without DP of the same recipe, as the goals are.
        share = (
            row["accuracy"] / plain["accuracy"]
            if plain is not None and plain["accuracy"] > 0
            else row.get("share_of_non_private")
        )
        shown = _NOT_MEASURED if share is None else _pct(share)
        lines.append(
            f"| {epsilon} ({row['delta']:g}) | {_pct(row['accuracy'])} "
            f"({_interval(row['ci95'])}) | {shown if readable else UNREADABLE_SHARE} |"
        )
    plain = rows.get("no_dp")
    accuracy = (
        _NOT_MEASURED
        if plain is None
        else f"{_pct(plain['accuracy'])} ({_interval(plain['ci95'])})"
    )
    lines += [f"| none (no DP) | {accuracy} | - |", ""]
    eps8 = rows.get("eps8")
    if readable and plain is not None and eps8 is not None:
        share = eps8["accuracy"] / plain["accuracy"]
        verdict = "met" if share >= GOALS["eps8"] else "not met"
        verdict = f"the goal of 90% is {verdict}"
        if share < 0.5:
            verdict += (
                ": at these sites' size and training budget the guarantee holds, but the model "
                "it leaves is far less accurate than the one trained without it"
            )
        lines += [
            f"At record-level epsilon 8 the model keeps {_pct(share)} of the accuracy that "
            f"training without DP reaches ({_pct(eps8['accuracy'])}, "
            f"{_interval(eps8['ci95'])}, against {_pct(plain['accuracy'])}, the same "
            f"recipe); {verdict}.",
            "",
        ]
    others = [
        row
        for row in all_rows
        if reference is not None and training_recipe(_row_recipe(row, utility or {})) != reference
    ]
    if others:
        lines += [
            "Also measured, with other recipes (not comparable with the row without DP, which "
            "was trained with another):",
            "",
            *(
                f"- {_setting_words(row)}: {_pct(row['accuracy'])} "
                f"({_interval(row['ci95'])}) with {_adapter(recipe)}, expected batch "
                f"{recipe['expected_batch_size']}, learning rate {recipe['learning_rate']:g}"
                for row in others
                for recipe in [_row_recipe(row, utility or {})]
            ),
            "",
        ]
    listed = [*rows.values(), *others]
    collapsed = sorted({int(row["gold_count"]) for row in listed if _collapsed_at_zero(row)})
    if collapsed:
        lines += [
            "An interval of 0.00% to 0.00% means that no gold record was answered right: the "
            "bootstrap over the records then has nothing to vary, and understates the "
            "uncertainty. The exact (Clopper-Pearson) 95% interval for 0 right of "
            + " or ".join(f"{n} is 0% to {_pct(1 - 0.025 ** (1 / n))}" for n in collapsed)
            + ".",
            "",
        ]
    if not readable:
        lines += [
            "These rows do not yet say what DP costs: in the run measured, training without DP "
            "did not teach the headline either (its interval includes 0), so no share of it "
            "can be read. See the privacy/utility section of docs/benchmarks.md.",
            "",
        ]
    no_dp, dp = (attacks or {}).get("no_dp"), (attacks or {}).get("dp")

    def cell(summary: dict[str, Any] | None, key: str) -> str:
        if summary is None or summary.get(key) is None:
            return _NOT_MEASURED
        value = summary[key]
        if key == "p_value":
            return f"{value:.2g}"
        interval = summary.get(f"{key}_ci95")
        return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    dp_label = "with record-level DP"
    if dp is not None and dp.get("epsilon") is not None:
        dp_label += f" (epsilon {dp['epsilon']:.2f})"
    lines += [
        f"| attack on SmolLM2 | without DP | {dp_label} |",
        "|---|---|---|",
        "| planted canaries exposed (p-value; below 1e-4 = exposed, above 1e-3 = hidden) | "
        f"{cell(no_dp, 'p_value')} | {cell(dp, 'p_value')} |",
        "| membership inference AUC (0.5 = no signal) | "
        f"{cell(no_dp, 'membership_auc')} | {cell(dp, 'membership_auc')} |",
    ]
    if attacks is not None:
        lines += ["", f"The attacked federation: {_attack_training(attacks, reference)}."]
    return lines


def _collapsed_at_zero(row: dict[str, Any]) -> bool:
    """Whether a row scored no gold record right, so its bootstrap interval is one point."""
    return row["accuracy"] == 0 and "gold_count" in row


def _setting_words(row: dict[str, Any]) -> str:
    return "no DP" if row["epsilon"] is None else f"epsilon {row['epsilon']:g}"


def _auc_interval(row: dict[str, Any]) -> str:
    interval = row.get("membership_auc_ci95")
    if not interval:
        return " (no interval: measured before intervals were recorded)"
    return f" [{interval[0]:.3f}, {interval[1]:.3f}] on {row['membership_records']} + " + (
        f"{row['membership_records']} records"
    )


def fill_compliance_page(
    utility: dict[str, Any] | None, attacks: dict[str, Any] | None, page: Path = COMPLIANCE_PAGE
) -> None:
    """Rewrite the tables between the page's markers from the results."""
    replace_between(page, _COMPLIANCE_MARKERS, compliance_table(utility, attacks))


def replace_between(page: Path, markers: tuple[str, str], lines: list[str]) -> None:
    """Replace what stands between the page's two marker lines by ``lines``."""
    text = page.read_text(encoding="utf-8")
    start, end = markers
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = "\n".join(lines)
    page.write_text(f"{head}{start}\n{body}\n{end}{tail}", encoding="utf-8")


def signal_section(results: dict[str, dict[str, Any]]) -> list[str]:
    """Signal against noise in one DP-SGD step, one table pair per dp_signal.py results file."""
    lines = ["## Why record-level DP costs so much here: signal and noise in one step", ""]
    if not results:
        return [*lines, "Not measured yet: run `python benchmarks/dp_signal.py`.", ""]
    for name, result in sorted(results.items()):
        lines += _signal_tables(name, result)
    return lines


def _signal_tables(name: str, result: dict[str, Any]) -> list[str]:
    recipe = result["recipe"]
    batch, clip = recipe["expected_batch_size"], recipe["max_grad_norm"]
    lines = [
        f"### `{name}`: {_adapter(recipe)}, expected batch {batch}",
        "",
        "`python benchmarks/dp_signal.py`: the adapter's per-example gradients on "
        f"{result['points'][0]['records']} records of site `{result['site']}` of the privacy/"
        f"utility federation (`{result['model']}`, {result['trained_parameters']:,} trained "
        f"parameters, {result['precision']}), at the untrained adapter and at DP runs' last "
        f"checkpoints. The signal of one step is the norm of the mean clipped gradient (clip "
        f"{clip:g}; at most {clip:g}, reached only if every example's gradient points the same "
        f"way); the noise on that mean is z x {clip:g} / {batch} per coordinate, "
        "z x C x sqrt(d) / B in norm, with the noise multiplier z each site calibrates for the "
        f"recipe ({result['noise'][0]['steps']} steps at sampling rate "
        f"{batch}/{result['records_per_site']}).",
        "",
        "| point | mean loss | per-example gradient norm, median [p10, p90] | clipped | "
        "mean clipped gradient (signal) |",
        "|---|---:|---|---:|---:|",
    ]
    for point in result["points"]:
        norms = point["per_example_norm"]
        lines.append(
            f"| {point['point']} | {point['mean_loss']:.3f} | {norms['median']:.2f} "
            f"[{norms['p10']:.2f}, {norms['p90']:.2f}] | {_pct(point['share_clipped'])} | "
            f"{point['mean_clipped_gradient_norm']:.3f} |"
        )
    lines += [
        "",
        "| epsilon | noise multiplier z | noise per coordinate | noise norm | "
        + " | ".join(f"signal / noise, {p['point']}" for p in result["points"])
        + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(result["points"]),
    ]
    ratios = {(r["point"], r["epsilon"]): r["signal_to_noise"] for r in result["signal_to_noise"]}
    for row in result["noise"]:
        cells = " | ".join(f"{ratios[(p['point'], row['epsilon'])]:.4f}" for p in result["points"])
        lines.append(
            f"| {row['epsilon']:g} | {row['noise_multiplier']:.3f} | "
            f"{row['noise_per_coordinate']:.4f} | {row['noise_norm']:.1f} | {cells} |"
        )
    lines += [
        "",
        f"Averaging {result['num_sites']} sites' updates divides the noise norm by "
        f"sqrt({result['num_sites']}) at most. Measured {result['measured_at']} in "
        f"{result['seconds'] / 60:.1f} min; source: `benchmarks/results/{name}`.",
        "",
    ]
    return lines
