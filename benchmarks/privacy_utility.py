"""What record-level DP costs in accuracy, at a site's real size.

    python benchmarks/privacy_utility.py [--resume] [--records-per-site 2000] [--sites 4]
        [--epsilons 1,3,8,inf] [--model smollm2-135m-instruct]
    python benchmarks/privacy_utility.py --smoke --out /tmp/privacy-utility.json   # tiny model

The ICD-10 federation of ``fedsilo.bench.dp_recipe`` (4 specialty hospitals of 2,000 records
each by default) trains once per record-level epsilon with the DP recipe (Poisson-sampled
expected batches, local work in epochs, the target epsilon split over the rounds by each site's
accountant); ``inf`` is the same federation without DP. Each row holds the headline of the
quality benchmark: category accuracy on ICD-10 gold part a (unseen codes of trained
categories) with its 95% bootstrap interval, and the share of the non-private accuracy it
keeps (against the latest no-DP row of its own recipe). Each row carries the recipe it trained
with, where its hyperparameters came from and its run folder under ``--runs`` (named by setting
and recipe); a setting re-measured with a new recipe is a new row beside the old one (the goals
read the latest row of each setting trained with the recipe of the most accurate no-DP row).
Writes
benchmarks/results/privacy-utility.json after every setting, keeping the rows other processes
measured for the same federation (processes measuring different ``--epsilons`` may share one
file). ``--resume`` also skips the (setting, recipe) rows already there and continues an
interrupted setting from its last checkpoint. One torch thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedsilo.bench.dp_recipe import (
    DpRecipe,
    Federation,
    ResultsFileConflictError,
    add_schedule_arguments,
    merge_results,
    run_federation,
    save_row,
    schedule_from,
    smoke_setup,
    stored_results,
    training_recipe,
    utility_config,
)
from fedsilo.config.schema import DEFAULT_TARGET_MODULES
from fedsilo.evaluation.gold import HEADLINE_PART
from fedsilo.server.run_folder import RunFolder

RESULTS = Path(__file__).parent / "results"
HEADLINE = HEADLINE_PART["icd10"]


def _setting(epsilon: float) -> str:
    return "no_dp" if math.isinf(epsilon) else f"eps{epsilon:g}"


def _row(
    epsilon: float,
    metrics: list[dict[str, Any]],
    seconds: float,
    measured_at: str,
    recipe: dict[str, Any],
    chosen_by: str,
) -> dict[str, Any]:
    final = metrics[-1]
    part = final["gold_parts"][HEADLINE]
    # Gold is scored every eval_every_rounds rounds (round 0 and the last always).
    scored = [m for m in metrics if "gold_parts" in m]
    private = not math.isinf(epsilon)
    return {
        "setting": _setting(epsilon),
        # JSON has no infinity: null is "no DP" (epsilon infinite), as is a null delta.
        "epsilon": epsilon if private else None,
        "delta": final.get("delta") if private else None,
        "accuracy": part["category_accuracy"],
        "ci95": part.get("category_accuracy_ci95"),
        "exact_code_accuracy": part["accuracy"],
        "gold_count": part["count"],
        "gold_loss": final["gold_loss"],
        "spent_epsilon": final.get("epsilon"),
        "rounds": final["round"],
        # Round 0 is the base model before any training: the floor every setting starts from.
        "scored_rounds": [m["round"] for m in scored],
        "accuracy_per_round": [m["gold_parts"][HEADLINE]["category_accuracy"] for m in scored],
        "gold_loss_per_round": [m["gold_loss"] for m in scored],
        "recipe": recipe,
        "hyperparameters_from": chosen_by,
        "run": _run_name(_setting(epsilon), recipe),
        "seconds": seconds,
        "measured_at": measured_at,
    }


def _with_shares(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with the share it keeps of the accuracy of the latest row without DP trained
    with the same recipe (None where no such row exists: another recipe's accuracy is no
    reference)."""

    def trained_as(row: dict[str, Any]) -> str:
        return json.dumps(training_recipe(row["recipe"]), sort_keys=True)

    plain = sorted((row for row in rows if row["setting"] == "no_dp"), key=_measured_at)
    base = {trained_as(row): row for row in plain}

    def share(row: dict[str, Any]) -> float | None:
        reference = base.get(trained_as(row))
        return (
            row["accuracy"] / reference["accuracy"] if reference and reference["accuracy"] else None
        )

    return [{**row, "share_of_non_private": share(row)} for row in rows]


def _measured_at(row: dict[str, Any]) -> str:
    return str(row["measured_at"])


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return bool(old["setting"] == new["setting"] and old.get("recipe") == new["recipe"])


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rows": _with_shares(rows)}


def _swept(path: Path, args: argparse.Namespace) -> tuple[int, float, float, str]:
    """The expected batch, clip and learning rate of the sweep's best point, after checking
    it fits this run."""
    sweep = json.loads(path.read_text(encoding="utf-8"))
    best = sweep.get("best")
    if not isinstance(best, dict):
        raise SystemExit(f"{path}: no measured point to take hyperparameters from")
    wanted = {"model": args.model, "records_per_site": args.records_per_site}
    if not args.smoke and any(sweep.get(key) != value for key, value in wanted.items()):
        found = {key: sweep.get(key) for key in wanted}
        raise SystemExit(f"{path}: the sweep ran {found}, this benchmark runs {wanted}")
    batch, clip, rate = (
        int(best["expected_batch_size"]),
        float(best["clip"]),
        float(best["learning_rate"]),
    )
    return batch, clip, rate, f"{path.name}: lowest validation loss at epsilon {sweep['epsilon']:g}"


# What a sweep file written before these recipe fields existed trained with.
_SWEPT_BEFORE_THE_FIELD = {
    "lr_schedule": "constant",
    "warmup_rounds": 0,
    "server_momentum": 0.0,
    "lora_targets": list(DEFAULT_TARGET_MODULES),
}


def _check_same_recipe(sweep: Path | None, swept: dict[str, Any], running: dict[str, Any]) -> None:
    """Refuse hyperparameters chosen for another recipe (rounds, epochs, adapter, schedule).
    Without a sweep file the command line chose them: nothing to check."""
    if sweep is None:
        return

    def comparable(key: str, value: Any) -> Any:
        return sorted(value) if key == "lora_targets" else value

    measured = training_recipe({**_SWEPT_BEFORE_THE_FIELD, **swept})
    differing = {
        key: (value, running[key])
        for key, value in measured.items()
        if key in running and comparable(key, value) != comparable(key, running[key])
    }
    if differing:
        shown = ", ".join(
            f"{key} {there!r} there, {here!r} here" for key, (there, here) in differing.items()
        )
        raise SystemExit(f"{sweep}: its points were measured with another recipe: {shown}")


def _run_name(setting: str, recipe: dict[str, Any]) -> str:
    """The run folder of a (setting, recipe) row: another recipe never resumes this run."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return f"{setting}-{digest[:8]}"


def _migrate_old_format(out: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``out`` (none if absent), each with its recipe.

    Files written before rows carried their recipe hold one ``recipe`` and
    ``hyperparameters_from`` for all rows at the top level: they are moved into the rows (and
    the file rewritten), so that new rows with their own recipes can stand beside them.
    """
    try:
        stored = stored_results(out, header)
    except ResultsFileConflictError as error:
        raise SystemExit(str(error)) from error
    if stored is None:
        return []
    if "recipe" not in stored:
        return list(stored["rows"])

    def moved(previous: dict[str, Any] | None) -> dict[str, Any]:
        content = dict(previous or stored)
        recipe = content.pop("recipe")
        chosen_by = content.pop("hyperparameters_from", "not recorded")
        content["rows"] = [
            {"recipe": recipe, "hyperparameters_from": chosen_by, **row} for row in content["rows"]
        ]
        return content

    return list(merge_results(out, header, moved)["rows"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    defaults, recipe_defaults = Federation(model="smollm2-135m-instruct"), DpRecipe()
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--sites", type=int, default=defaults.num_sites)
    parser.add_argument("--records-per-site", type=int, default=defaults.records_per_site)
    parser.add_argument(
        "--chapters",
        default=",".join(defaults.chapters),
        help="comma-separated ICD-10-CM chapters, one specialty per site (default "
        f"{','.join(defaults.chapters)}); a chapter needs records-per-site + gold codes",
    )
    parser.add_argument("--gold-size", type=int, default=defaults.gold_size)
    parser.add_argument("--epsilons", default="1,3,8,inf")
    parser.add_argument("--rounds", type=int, default=recipe_defaults.rounds)
    parser.add_argument("--local-epochs", type=float, default=recipe_defaults.local_epochs)
    parser.add_argument("--batch-size", type=int, default=recipe_defaults.expected_batch_size)
    parser.add_argument("--learning-rate", type=float, default=recipe_defaults.learning_rate)
    parser.add_argument("--clip", type=float, default=recipe_defaults.max_grad_norm)
    parser.add_argument("--ffa", action="store_true", help="FFA-LoRA (A frozen) instead of LoRA")
    add_schedule_arguments(parser)
    parser.add_argument(
        "--from-sweep",
        type=Path,
        default=None,
        help="take --batch-size, --clip and --learning-rate from the best point of this "
        "dp_sweep.py result",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--runs", type=Path, default=Path("runs") / "privacy-utility")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 small sites, 1 round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epsilons = [float(text) for text in args.epsilons.split(",") if text.strip()]
    if any(not epsilon > 0 for epsilon in epsilons):
        raise SystemExit(f"--epsilons must be positive (or inf), got {args.epsilons}")

    chosen_by = "command line (not chosen by a sweep)"
    sweep_recipe: dict[str, Any] = {}
    if args.from_sweep is not None:
        args.batch_size, args.clip, args.learning_rate, chosen_by = _swept(args.from_sweep, args)
        sweep_recipe = json.loads(args.from_sweep.read_text(encoding="utf-8"))["recipe"]
    scratch = Path(tempfile.mkdtemp(prefix="fedsilo-privacy-utility-"))
    if args.smoke:
        federation, recipe = smoke_setup(scratch)
        if args.from_sweep is not None:
            recipe = replace(
                recipe,
                expected_batch_size=args.batch_size,
                max_grad_norm=args.clip,
                learning_rate=args.learning_rate,
            )
        out = args.out or scratch / "privacy-utility.json"
        runs = scratch / "runs"
    else:
        chapters = tuple(text.strip() for text in args.chapters.split(",") if text.strip())
        if len(chapters) < args.sites:
            raise SystemExit(
                f"--chapters names {len(chapters)} chapter(s) for {args.sites} sites: "
                "give at least one per site"
            )
        federation = Federation(
            model=args.model,
            num_sites=args.sites,
            records_per_site=args.records_per_site,
            gold_size=args.gold_size,
            chapters=chapters[: args.sites],
        )
        recipe = schedule_from(
            args,
            DpRecipe(
                expected_batch_size=args.batch_size,
                local_epochs=args.local_epochs,
                rounds=args.rounds,
                learning_rate=args.learning_rate,
                max_grad_norm=args.clip,
                ffa=args.ffa,
            ),
        )
        out, runs = args.out or RESULTS / "privacy-utility.json", args.runs
    _check_same_recipe(args.from_sweep, sweep_recipe, recipe.to_json())
    header = {
        "benchmark": "privacy-utility",
        "model": args.model if not args.smoke else "tiny",
        "records_per_site": federation.records_per_site,
        "num_sites": federation.num_sites,
        "chapters": list(federation.chapters),
        "gold_size": federation.gold_size,
        "headline": f"category accuracy on ICD-10 gold part a ({HEADLINE}), 95% bootstrap CI",
    }
    stored_rows = _migrate_old_format(out, header)
    rows = stored_rows if args.resume else []
    for epsilon in epsilons:
        name = _setting(epsilon)
        run_dir = runs / _run_name(name, recipe.to_json())
        kept = next(
            (r for r in rows if r["setting"] == name and r.get("recipe") == recipe.to_json()),
            None,
        )
        if kept is not None:
            print(f"{name}: already measured, kept")
            finished = RunFolder(run_dir).read_metrics() if run_dir.is_dir() else []
            if finished and finished[-1]["round"] == kept["rounds"]:
                # The row is a function of its run's metrics: rebuilt, so fields added to
                # the row since the run was measured are filled from the same run.
                row = _row(
                    epsilon,
                    finished,
                    kept["seconds"],
                    kept["measured_at"],
                    recipe.to_json(),
                    kept["hyperparameters_from"],
                )
                rows = save_row(out, header, row, rows_key="rows", same=_same, summary=_summary)
            continue
        config = utility_config(
            federation, recipe, epsilon=None if math.isinf(epsilon) else epsilon
        )
        started = time.perf_counter()
        metrics = run_federation(config, run_dir, resume=args.resume)
        measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        row = _row(
            epsilon,
            metrics,
            time.perf_counter() - started,
            measured_at,
            recipe.to_json(),
            chosen_by,
        )
        # Settings may run in parallel processes (--epsilons 1,3 and --epsilons 8,inf into one
        # --out): the file is merged under a lock, each process keeping the others' rows.
        rows = save_row(out, header, row, rows_key="rows", same=_same, summary=_summary)
        print(name, json.dumps({"accuracy": row["accuracy"], "ci95": row["ci95"]}))
    if args.smoke:  # the smoke run's federations are not kept, only its results
        shutil.rmtree(runs, ignore_errors=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
