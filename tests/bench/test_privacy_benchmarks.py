"""The DP recipe's federations and the privacy benchmarks' smoke runs on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedsilo.bench.dp_recipe import (
    DpRecipe,
    Federation,
    ResultsFileConflictError,
    save_row,
    utility_config,
    validation_config,
)
from fedsilo.data.icd10 import build_icd10_task
from fedsilo.data.records import ChatRecord, load_records

from . import benchmark_script

# The settings of a recipe attack run as privacy_attacks.py --recipe records them.
RECIPE_ATTACK_SETTINGS = {
    "sites": 4,
    "records_per_site": 2000,
    "held_out": 500,
    "canaries": 2,
    "repeats": 16,
    "candidates": 1000,
}


def _pairs(path: Path) -> set[tuple[str, str]]:
    return {(r.prompt, r.response) for r in load_records(path) if isinstance(r, ChatRecord)}


def test_the_validation_split_holds_site_records_never_trained_on_and_never_gold(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    federation = Federation(
        model=str(tiny_model_dir), num_sites=2, records_per_site=20, gold_size=6
    )

    config = validation_config(
        federation, DpRecipe(), epsilon=8.0, validation_share=0.2, work=tmp_path
    )

    validation = _pairs(config.task.gold_path or tmp_path / "missing")
    trained = set().union(*(_pairs(site.path) for site in config.task.sites))
    gold = build_icd10_task(
        num_sites=2,
        partition="by-chapter",
        alpha=1.0,
        examples_per_site=20,
        gold_size=6,
        seed=0,
        chapters=federation.chapters,
    ).gold
    assert len(validation) == 8 and len(trained) == 32  # 4 + 16 of each site's 20
    assert not validation & trained
    assert not validation & {(r.prompt, r.response) for r in gold if isinstance(r, ChatRecord)}


def test_the_utility_federation_uses_epochs_large_batches_and_the_run_target(
    tiny_model_dir: Path,
) -> None:
    federation = Federation(model=str(tiny_model_dir), records_per_site=2000)
    recipe = DpRecipe(expected_batch_size=512, local_epochs=2.0, rounds=3)

    private = utility_config(federation, recipe, epsilon=3.0)
    plain = utility_config(federation, recipe, epsilon=None)

    assert (private.train.local_epochs, private.train.local_steps) == (2.0, None)
    assert private.train.batch_size == 512 and private.run.rounds == 3
    assert private.privacy.record_level and private.privacy.target_epsilon == 3.0
    assert private.task.examples_per_site == 2000
    assert not plain.privacy.record_level
    assert plain.train == private.train


def test_the_recipe_shape_across_rounds_reaches_both_federations(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    federation = Federation(model=str(tiny_model_dir), num_sites=2, records_per_site=20)
    recipe = DpRecipe(
        rounds=28,
        lr_schedule="cosine",
        warmup_rounds=2,
        server_momentum=0.7,
        eval_every_rounds=7,
        lora_rank=16,
        lora_targets=("q_proj", "v_proj"),
    )

    for config in (
        utility_config(federation, recipe, epsilon=8.0),
        validation_config(federation, recipe, epsilon=8.0, validation_share=0.2, work=tmp_path),
    ):
        assert (config.train.lr_schedule, config.train.warmup_rounds) == ("cosine", 2)
        assert config.strategy.server_momentum == 0.7
        assert config.evaluation.every_rounds == 7
        assert config.lora.rank == 16
        assert config.lora.target_modules == ("q_proj", "v_proj")


@pytest.mark.slow
def test_privacy_utility_smoke_writes_the_contract_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "privacy-utility.json"
    script = benchmark_script("privacy_utility")

    script.main(["--smoke", "--epsilons", "8,inf", "--out", str(out)])
    first = json.loads(out.read_text())
    script.main(["--smoke", "--epsilons", "3,8,inf", "--out", str(out), "--resume"])
    second = json.loads(out.read_text())

    assert {"model", "records_per_site", "rows"} <= set(first)
    assert [row["setting"] for row in first["rows"]] == ["eps8", "no_dp"]
    for row in first["rows"]:
        assert {"setting", "epsilon", "delta", "accuracy", "ci95"} <= set(row)
        low, high = row["ci95"]
        assert 0.0 <= low <= row["accuracy"] <= high <= 1.0
    eps8, no_dp = first["rows"]
    assert (eps8["epsilon"], eps8["delta"]) == (8.0, 1e-5)
    assert all(0 < spent <= 8.0 for spent in eps8["spent_epsilon"].values())
    assert (no_dp["epsilon"], no_dp["delta"]) == (None, None)
    # Resumed: the measured rows are kept as they were, only epsilon 3 is new.
    assert [row["setting"] for row in second["rows"]] == ["eps8", "no_dp", "eps3"]
    assert second["rows"][0]["measured_at"] == eps8["measured_at"]


@pytest.mark.slow
@pytest.mark.parametrize("budget", [[], ["--recipe"]], ids=["experiment", "recipe"])
def test_privacy_attacks_smoke_writes_no_dp_and_dp(tmp_path: Path, budget: list[str]) -> None:
    out = tmp_path / "attacks.json"

    benchmark_script("privacy_attacks").main(["--smoke", "--out", str(out), *budget])

    result = json.loads(out.read_text())
    assert ("recipe" in result) == bool(budget)
    assert {"p_value", "membership_auc"} <= set(result["no_dp"])
    assert {"p_value", "membership_auc", "epsilon"} <= set(result["dp"])
    assert 0 < result["dp"]["epsilon"] <= 8.0
    assert 0.0 <= result["no_dp"]["membership_auc"] <= 1.0


def test_privacy_attacks_refuses_a_results_file_of_other_settings_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = benchmark_script("privacy_attacks")
    out = tmp_path / "attacks.json"
    out.write_text(json.dumps({"benchmark": "privacy-attacks", "model": "tiny", "settings": {}}))

    def must_not_train(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained before the results file was checked")

    monkeypatch.setattr(script, "_recipe_outcome", must_not_train)
    with pytest.raises(ResultsFileConflictError, match="other settings"):
        script.main(["--smoke", "--recipe", "--out", str(out)])


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--recipe", "--rounds", "5"], "--rounds: not used with --recipe"),
        (["--held-out", "100", "--resume"], "--held-out, --resume: not used without --recipe"),
    ],
)
def test_privacy_attacks_refuses_options_of_the_other_budget(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        benchmark_script("privacy_attacks").main(argv)

    assert named in capsys.readouterr().err


def test_recipe_attack_runs_are_kept_apart_by_what_they_measure() -> None:
    script = benchmark_script("privacy_attacks")
    header = {"benchmark": "privacy-attacks", "settings": {"held_out": 500}}

    assert script._digest(header) == script._digest(dict(reversed(header.items())))
    assert script._digest(header) != script._digest({**header, "settings": {"held_out": 400}})


def test_the_attack_table_says_which_federation_was_attacked_and_what_is_missing() -> None:
    report = benchmark_script("report_privacy")
    row = {
        "epsilon": {"site-a": 7.99},
        "planted_exposure": [1.2],
        "never_inserted_exposure": [0.8],
        "planted_p_value": 0.4,
        "never_inserted_p_value": 0.6,
        "max_exposure": 9.97,
        "membership_auc": 0.51,
        "membership_auc_ci95": [0.47, 0.55],
        "membership_records": 500,
        "gold_loss": 1.75,
        "gold_category_accuracy": 0.015,
        "gold_category_accuracy_ci95": [0.0, 0.035],
    }
    result = {
        "settings": {"model": "smollm2-135m-instruct", **RECIPE_ATTACK_SETTINGS},
        "recipe": DpRecipe().to_json(),
        "results": {"record_dp": row},
        "measured_at": "2026-12-05T16:00:00Z",
        "machine": {"cpus": 2},
    }

    text = "\n".join(report.attack_section({"privacy-attacks-smollm2.json": result}))

    assert "4 sites of 2,000 records, 28 rounds of 4 steps of batch 32" in text
    assert "| no DP | not measured yet |" in text
    assert "| 0.510 [0.470, 0.550] on 500 + 500 records | 1.750, 1.5% [0.0%, 3.5%] |" in text
    assert "source: `benchmarks/results/privacy-attacks-smollm2.json`" in text


@pytest.mark.slow
def test_dp_sweep_smoke_picks_the_lowest_validation_loss_for_the_utility_run(
    tmp_path: Path,
) -> None:
    sweep_out, utility_out = tmp_path / "dp-sweep.json", tmp_path / "utility.json"

    benchmark_script("dp_sweep").main(["--smoke", "--out", str(sweep_out)])
    sweep = json.loads(sweep_out.read_text())
    benchmark_script("privacy_utility").main(
        ["--smoke", "--epsilons", "8", "--from-sweep", str(sweep_out), "--out", str(utility_out)]
    )
    utility = json.loads(utility_out.read_text())

    assert [(p["clip"], p["learning_rate"]) for p in sweep["points"]] == [(0.1, 0.01), (1.0, 0.01)]
    assert sweep["best"] == min(sweep["points"], key=lambda p: p["validation_loss"])
    (row,) = utility["rows"]
    assert row["recipe"]["max_grad_norm"] == sweep["best"]["clip"]
    assert row["recipe"]["expected_batch_size"] == sweep["best"]["expected_batch_size"]
    assert row["hyperparameters_from"].startswith("dp-sweep.json")


def test_hyperparameters_swept_for_another_recipe_are_refused(tmp_path: Path) -> None:
    script = benchmark_script("privacy_utility")
    swept = {"rounds": 2, "local_epochs": 1.0, "lora_targets": ["q_proj", "v_proj"]}

    script._check_same_recipe(tmp_path / "s.json", swept, dict(swept))
    with pytest.raises(SystemExit, match="rounds 2 there, 28 here"):
        script._check_same_recipe(tmp_path / "s.json", swept, {**swept, "rounds": 28})
    # A sweep file from before the schedule fields existed trained at a constant rate.
    with pytest.raises(SystemExit, match="lr_schedule 'constant' there, 'cosine' here"):
        script._check_same_recipe(tmp_path / "s.json", swept, {**swept, "lr_schedule": "cosine"})
    # The order of the adapted layers and how often validation is scored change nothing.
    script._check_same_recipe(
        tmp_path / "s.json",
        {**swept, "eval_every_rounds": 1},
        {**swept, "lora_targets": ["v_proj", "q_proj"], "eval_every_rounds": 7},
    )
    # Hyperparameters from the command line (no sweep file) are not checked against one.
    script._check_same_recipe(None, {}, {**swept, "lr_schedule": "cosine"})


def test_privacy_utility_refuses_fewer_chapters_than_sites(tmp_path: Path) -> None:
    script = benchmark_script("privacy_utility")

    with pytest.raises(SystemExit, match="names 2 chapter\\(s\\) for 3 sites"):
        script.main(["--sites", "3", "--chapters", "19,20", "--out", str(tmp_path / "u.json")])
    assert not (tmp_path / "u.json").exists()


def test_the_compliance_page_shows_not_measured_until_the_benchmarks_ran(tmp_path: Path) -> None:
    report = benchmark_script("report_privacy")
    page = tmp_path / "page.md"
    committed = report.COMPLIANCE_PAGE.read_text()
    page.write_text(committed)

    report.fill_compliance_page(None, None, page)

    filled = page.read_text()
    assert filled.count("not measured yet") == 11  # every cell of both tables
    # Only the tables between the markers change; the prose around them is the committed one.
    start, end = "<!-- compliance-table -->", "<!-- end-compliance-table -->"
    assert filled.split(start)[0] == committed.split(start)[0]
    assert filled.split(end)[1] == committed.split(end)[1]


def test_the_compliance_page_shows_measured_rows(tmp_path: Path) -> None:
    report = benchmark_script("report_privacy")
    page = tmp_path / "page.md"
    page.write_text(report.COMPLIANCE_PAGE.read_text())
    utility = {
        "rows": [
            {
                "setting": "eps8",
                "delta": 1e-5,
                "accuracy": 0.5,
                "ci95": [0.4, 0.6],
                "share_of_non_private": 0.9,
            }
        ]
    }
    attacks = {
        "settings": RECIPE_ATTACK_SETTINGS,
        "recipe": DpRecipe().to_json(),
        "no_dp": {"p_value": 1e-6, "membership_auc": 0.81},
        "dp": {"p_value": 0.4, "membership_auc": 0.52, "epsilon": 7.99},
    }

    report.fill_compliance_page(utility, attacks, page)

    text = page.read_text()
    assert "| 8 (1e-05) | 50.0% (40.0% to 60.0%) | 90.0% |" in text
    assert "| 3 | not measured yet | not measured yet |" in text
    assert "| 1e-06 | 0.4 |" in text and "| 0.810 | 0.520 |" in text
    assert "with record-level DP (epsilon 7.99)" in text
    assert "4 sites of 2,000 records, 28 rounds of 4 steps of batch 32 (Poisson-sampled" in text


def test_goals_are_read_only_when_the_non_private_federation_learned() -> None:
    report = benchmark_script("report_privacy")
    untrained = {"setting": "no_dp", "accuracy": 0.015, "ci95": [0.0, 0.035]}
    trained = {"setting": "no_dp", "accuracy": 0.40, "ci95": [0.33, 0.47]}
    eps8 = {"setting": "eps8", "accuracy": 0.38, "ci95": [0.31, 0.45]}
    eps3 = {"setting": "eps3", "accuracy": 0.20, "ci95": [0.15, 0.26]}

    assert report.rows_goal([untrained, eps8]).startswith("**The goals cannot be read")
    assert report.rows_goal([trained, eps8, eps3]) == (
        "Goals: eps8 keeps 95.0% (goal 90.0%): met; eps3 keeps 50.0% (goal 75.0%): **not met**."
    )
    # A setting measured again with another recipe: the goal is read on its latest row.
    first = {**eps8, "accuracy": 0.01, "measured_at": "2026-12-05T11:04:42Z"}
    again = {**eps8, "measured_at": "2026-12-05T14:00:00Z"}
    assert report.rows_goal([trained, again, first]).startswith("Goals: eps8 keeps 95.0%")
    shares = [{**eps8, "delta": 1e-5, "share_of_non_private": 25.3}, untrained]
    table = "\n".join(report.compliance_table({"rows": shares}, None))
    assert "| 8 (1e-05) | 38.0% (31.0% to 45.0%) | not a measurement" in table
    assert "These rows do not yet say what DP costs" in table
    assert "keeps" not in table
    rows = [{**eps8, "delta": 1e-5, "share_of_non_private": 0.95}, trained]
    readable = "\n".join(report.compliance_table({"rows": rows}, None))
    assert "epsilon 8 the model keeps 95.0% of the accuracy" in readable
    assert "the goal of 90% is met." in readable


def test_goals_and_the_compliance_table_compare_rows_of_one_recipe_only() -> None:
    report = benchmark_script("report_privacy")
    wide = {**DpRecipe().to_json(), "eval_every_rounds": 7}
    narrow = {**wide, "lora_rank": 1, "expected_batch_size": 128, "learning_rate": 0.005}
    plain = {
        "setting": "no_dp",
        "epsilon": None,
        "delta": None,
        "accuracy": 0.78,
        "ci95": [0.72, 0.83],
        "recipe": wide,
        "measured_at": "2026-12-05T10:00:00Z",
    }
    same = {
        "setting": "eps8",
        "epsilon": 8.0,
        "delta": 1e-5,
        "accuracy": 0.015,
        "ci95": [0.0, 0.035],
        "recipe": wide,
        "measured_at": "2026-12-05T11:00:00Z",
    }
    # Measured later, with another recipe: it must not be read against the row without DP.
    later = {**same, "accuracy": 0.0, "ci95": [0.0, 0.0], "recipe": narrow,
             "measured_at": "2026-12-06T00:00:00Z"}  # fmt: skip
    rows = [plain, same, later]
    attacks = {
        "settings": RECIPE_ATTACK_SETTINGS,
        "recipe": {**wide, "eval_every_rounds": 28},  # scored less often, trained alike
        "no_dp": {"p_value": 1e-5, "membership_auc": 0.57},
        "dp": {"p_value": 0.49, "membership_auc": 0.49, "epsilon": 7.92},
    }

    assert report.rows_goal(rows).startswith("Goals: eps8 keeps 1.9% (goal 90.0%)")
    table = "\n".join(report.compliance_table({"rows": rows}, attacks))
    assert "| 8 (1e-05) | 1.5% (0.00% to 3.5%) | 1.9% |" in table
    assert "keeps 1.9% of the accuracy" in table
    assert "- epsilon 8: 0.00% (0.00% to 0.00%) with LoRA rank 1" in table
    assert "0 right of" not in table  # no row of the compared recipe scored zero
    zero = {**same, "setting": "eps3", "epsilon": 3.0, "accuracy": 0.0, "gold_count": 200}
    caveat = "\n".join(report.compliance_table({"rows": [*rows, zero]}, None))
    assert "The exact (Clopper-Pearson) 95% interval for 0 right of 200 is 0% to 1.8%." in caveat
    assert "(the recipe of the accuracy rows above)" in table
    other = "\n".join(report.compliance_table({"rows": rows}, {**attacks, "recipe": narrow}))
    assert "(not the recipe of the accuracy rows above)" in other


def test_results_from_separate_processes_are_merged_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "results" / "utility.json"
    header = {"model": "m", "records_per_site": 2000}

    def same(old: dict[str, object], new: dict[str, object]) -> bool:
        return old["setting"] == new["setting"]

    save_row(out, header, {"setting": "eps8", "accuracy": 0.1}, rows_key="rows", same=same)
    save_row(out, header, {"setting": "no_dp", "accuracy": 0.3}, rows_key="rows", same=same)
    save_row(out, header, {"setting": "eps8", "accuracy": 0.2}, rows_key="rows", same=same)
    merged = json.loads(out.read_text())
    with pytest.raises(ResultsFileConflictError, match="records_per_site: 2000 there, 96 here"):
        save_row(
            out, {**header, "records_per_site": 96}, {"setting": "eps1"}, rows_key="rows", same=same
        )

    assert merged["rows"] == [
        {"setting": "no_dp", "accuracy": 0.3},
        {"setting": "eps8", "accuracy": 0.2},
    ]
    assert json.loads(out.read_text()) == merged  # another federation's file is not replaced


def test_a_results_file_from_before_rows_had_recipes_keeps_its_rows(tmp_path: Path) -> None:
    script = benchmark_script("privacy_utility")
    out = tmp_path / "utility.json"
    header = {"benchmark": "privacy-utility", "records_per_site": 2000}
    recipe = {"rounds": 2, "lora_rank": 8}
    old_rows = [{"setting": "no_dp", "accuracy": 0.3}, {"setting": "eps8", "accuracy": 0.1}]
    out.write_text(
        json.dumps({**header, "recipe": recipe, "hyperparameters_from": "cli", "rows": old_rows})
    )

    rows = script._migrate_old_format(out, header)

    stored = json.loads(out.read_text())
    assert "recipe" not in stored and stored["rows"] == rows
    assert [(r["setting"], r["recipe"], r["hyperparameters_from"]) for r in rows] == [
        ("no_dp", recipe, "cli"),
        ("eps8", recipe, "cli"),
    ]
    assert script._migrate_old_format(out, header) == rows  # once moved, read as it is


def test_the_sweep_table_marks_the_lowest_validation_loss_of_each_schedule() -> None:
    report = benchmark_script("report_privacy")

    def sweep(ffa: bool, losses: list[float], rounds: int = 28) -> dict[str, object]:
        recipe = {"rounds": rounds, "local_epochs": 0.0625, "lora_rank": 16, "ffa": ffa}
        points = [
            {
                "expected_batch_size": 32,
                "clip": 1.0,
                "learning_rate": rate,
                "validation_loss": loss,
                "scored_rounds": [0, rounds],
                "validation_loss_per_round": [4.7, loss],
                "validation_category_accuracy": 0.0,
                "seconds": 60.0,
            }
            for rate, loss in zip((2e-3, 5e-3), losses, strict=False)
        ]
        common = {"records_per_site": 2000, "validation_share": 0.05, "num_sites": 1}
        return {**common, "epsilon": 8.0, "recipe": recipe, "points": points}

    table = "\n".join(
        report.sweep_section(
            {
                "lora.json": sweep(False, [1.95, 2.05]),
                "ffa.json": sweep(True, [2.16]),
                "old.json": sweep(False, [2.30], rounds=2),
            }
        )
    )

    assert table.count("| **") == 2  # one lowest point per schedule: 28 rounds and 2 rounds
    assert "| **28: 1.950** |" in table and "| **2: 2.300** |" in table
    assert "| 28: 2.160 |" in table and "| 28: 2.050 |" in table


def test_a_rows_share_is_of_the_no_dp_row_trained_with_its_own_recipe() -> None:
    script = benchmark_script("privacy_utility")
    wide, narrow = (
        {"lora_rank": 16, "eval_every_rounds": 7},
        {"lora_rank": 1, "eval_every_rounds": 7},
    )

    def row(setting: str, recipe: dict[str, int], accuracy: float, at: str) -> dict[str, object]:
        return {"setting": setting, "recipe": recipe, "accuracy": accuracy, "measured_at": at}

    rows = script._with_shares(
        [
            row("no_dp", wide, 0.8, "1"),
            row("eps8", wide, 0.2, "2"),
            row("no_dp", {**narrow, "eval_every_rounds": 4}, 0.5, "3"),  # scored more often only
            row("eps8", narrow, 0.4, "4"),
            row("eps3", {"lora_rank": 4, "eval_every_rounds": 7}, 0.3, "5"),
        ]
    )

    assert [r["share_of_non_private"] for r in rows] == [1.0, 0.25, 1.0, 0.8, None]


def test_goals_read_dp_rows_against_the_most_accurate_recipe_without_dp() -> None:
    report = benchmark_script("report_privacy")
    wide, narrow = {"lora_rank": 16}, {"lora_rank": 1}

    def row(setting: str, recipe: dict[str, int], accuracy: float, at: str) -> dict[str, Any]:
        return {"setting": setting, "recipe": recipe, "accuracy": accuracy, "measured_at": at}

    rows = [
        row("no_dp", wide, 0.78, "1"),
        row("eps8", wide, 0.015, "2"),
        row("eps8", narrow, 0.0, "3"),
        row("no_dp", narrow, 0.275, "4"),  # a weaker recipe, measured later
    ]

    assert report.reference_recipe(rows, {}) == wide
    read = report.comparable_per_setting(rows, {})
    assert read["eps8"]["accuracy"] == 0.015 and read["no_dp"]["accuracy"] == 0.78
