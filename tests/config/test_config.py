import os
from pathlib import Path

import pytest

from fedsilo.config import ConfigError, config_to_toml, load_config, parse_config


def test_empty_file_is_a_valid_default_config(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("")

    config = load_config(path)

    assert config.strategy.name == "fedavg"
    assert config.num_sites == 4


def test_error_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlearning_rate = -1\n")

    with pytest.raises(ConfigError, match=r"bad\.toml.*\n.*train\.learning_rate"):
        load_config(path)


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[strategy]\nproximal_muu = 0.1\n")

    with pytest.raises(ConfigError, match=r"strategy\.proximal_muu"):
        load_config(path)


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.name"):
        parse_config({"strategy": {"name": "fedmagic"}}, source="x.toml")


def test_min_sites_above_cohort_is_refused() -> None:
    with pytest.raises(ConfigError, match="min_sites=5 can never be met"):
        parse_config({"task": {"num_sites": 4}, "strategy": {"min_sites": 5}}, source="x.toml")


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[run\nname = 'x'")

    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_config(path)


def test_a_config_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("[run]\nname = 'Hôpital'\n".encode("latin-1"))

    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text"):
        load_config(path)


def test_files_task_paths_resolve_relative_to_config(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run.toml"
    path.parent.mkdir()
    path.write_text(
        '[task]\nname = "files"\ngold_path = "gold.jsonl"\n'
        '[[task.sites]]\nname = "a"\npath = "data/a.jsonl"\n'
        "[strategy]\nmin_sites = 1\n"
    )

    config = load_config(path)

    assert config.task.sites[0].path == path.parent.resolve() / "data" / "a.jsonl"
    assert config.task.gold_path == path.parent.resolve() / "gold.jsonl"


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = parse_config({"run": {"rounds": 7}, "lora": {"rank": 4}}, source="x")
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(config))

    assert load_config(path) == config


def test_secure_aggregation_defaults_off_and_round_trips() -> None:
    config = parse_config({"secure_aggregation": {"mode": "secagg", "threshold": 3}}, source="x")

    assert parse_config({}, source="x").secure_aggregation.mode == "none"
    assert config.secure_threshold == 3
    assert 'mode = "secagg"' in config_to_toml(config)


def test_secure_aggregation_threshold_must_be_a_majority() -> None:
    with pytest.raises(ConfigError, match="threshold=2 must be a majority of the 4 sites"):
        parse_config({"secure_aggregation": {"mode": "secagg", "threshold": 2}}, source="x")
    with pytest.raises(ConfigError, match=r"secure_aggregation\.mode"):
        parse_config({"secure_aggregation": {"mode": "masks"}}, source="x")


def test_default_threshold_is_a_majority_raised_to_min_sites() -> None:
    five = {"task": {"num_sites": 5}, "secure_aggregation": {"mode": "secagg"}}

    assert parse_config(five, source="x").secure_threshold == 3
    assert parse_config({**five, "strategy": {"min_sites": 4}}, source="x").secure_threshold == 4


def test_update_cosine_clusters_are_refused_under_secure_aggregation() -> None:
    settings = {"secure_aggregation": {"mode": "secagg"}, "clusters": {"method": "update-cosine"}}

    with pytest.raises(ConfigError, match="raw first update"):
        parse_config(settings, source="x")


def test_local_work_defaults_to_eight_steps() -> None:
    train = parse_config({}, source="t").train

    assert (train.local_steps, train.local_epochs) == (8, None)
    assert (train.lr_schedule, train.warmup_rounds) == ("constant", 0)


def test_local_work_in_epochs_round_trips_through_toml(tmp_path: Path) -> None:
    config = parse_config(
        {
            "train": {"local_epochs": 1.5, "lr_schedule": "cosine", "warmup_rounds": 2},
            "task": {"examples_per_site": "all", "gold_phrasings": 10},
        },
        source="t",
    )
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(config))

    again = load_config(path)

    assert again == config
    assert (again.train.local_steps, again.train.local_epochs) == (None, 1.5)
    assert again.task.examples_per_site == "all"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"local_steps": 4, "local_epochs": 1.0}}, "exactly one of local_steps"),
        ({"train": {"local_epochs": 0}}, "local_epochs"),
        ({"train": {"lr_schedule": "linear"}}, "lr_schedule"),
        ({"task": {"examples_per_site": "some"}}, "examples_per_site"),
        ({"task": {"gold_ranking_candidates": 1}}, "gold_ranking_candidates"),
    ],
)
def test_bad_training_and_gold_settings_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, source="t")


def test_record_level_dp_accepts_local_work_in_epochs() -> None:
    config = parse_config(
        {
            "train": {"local_epochs": 2.0, "batch_size": 512},
            "privacy": {"record_level": True, "target_epsilon": 8.0},
        },
        source="t",
    )

    assert (config.train.local_epochs, config.train.batch_size) == (2.0, 512)


def test_a_config_that_is_not_a_regular_file_or_too_large_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # opening it to read would block
    with pytest.raises(ConfigError, match=r"fifo\.toml: not a regular file"):
        load_config(fifo)

    large = tmp_path / "large.toml"
    large.write_text("[run]\nrounds = 3\n")
    monkeypatch.setattr("fedsilo.config.load.MAX_CONFIG_BYTES", 10)
    with pytest.raises(ConfigError, match=r"large\.toml: 17 bytes, over the 10-byte limit"):
        load_config(large)


def test_a_config_nested_too_deeply_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")

    with pytest.raises(ConfigError, match=r"deep\.toml: TOML nested too deeply"):
        load_config(path)
