"""Names that become paths (run folders, RUN/sites/NAME, key and policy files) stay inside."""

from typing import Any

import pytest

from fedsilo.config import ConfigError, parse_config

FILES_TASK: dict[str, Any] = {"name": "files", "gold_path": "gold.jsonl"}
ONE_SITE = {"min_sites": 1}
PIN = "ed25519:" + "A" * 43 + "="


@pytest.mark.parametrize("name", ["../escape", "..", ".", "a/b", "runs/../../x", "", "-x"])
def test_run_name_that_is_not_a_plain_name_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"run\.name"):
        parse_config({"run": {"name": name}}, source="x.toml")


@pytest.mark.parametrize("name", ["../../etc", "..", "a/b"])
def test_files_task_site_name_that_leaves_its_folder_is_refused(name: str) -> None:
    task = {**FILES_TASK, "sites": [{"name": name, "path": "a.jsonl"}]}

    with pytest.raises(ConfigError, match=r"task\.sites\[0\]\.name"):
        parse_config({"task": task, "strategy": ONE_SITE}, source="x.toml")


def test_enrolled_site_named_dot_dot_is_refused() -> None:
    federation = {"sites": [{"name": "..", "public_key": PIN}], "keys_dir": "keys"}

    with pytest.raises(ConfigError, match=r"federation\.sites\[0\]\.name"):
        parse_config({"federation": federation}, source="x.toml")


def test_only_sites_and_cluster_names_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"task\.only_sites"):
        parse_config({"task": {"only_sites": ["../x"]}}, source="x.toml")
    with pytest.raises(ConfigError, match=r"clusters\.groups"):
        parse_config(
            {"clusters": {"method": "groups", "groups": {"../up": ["a"]}}}, source="x.toml"
        )


def test_plain_names_are_kept() -> None:
    task = {**FILES_TASK, "sites": [{"name": "st-mary_2.b", "path": "a.jsonl"}]}

    config = parse_config(
        {"run": {"name": "cardio-pilot.v2"}, "task": task, "strategy": ONE_SITE}, source="x.toml"
    )

    assert config.run.name == "cardio-pilot.v2"
    assert config.task.sites[0].name == "st-mary_2.b"
