"""The attack federations' members and non-members are draws from the same records."""

import json
from collections import Counter
from pathlib import Path

import pytest

from fedsilo.bench.dp_recipe import DpRecipe, Federation, attack_config
from fedsilo.privacy.attacks.canary import CANARY_PROMPT
from fedsilo.simulation.canary_experiment import CanaryExperiment, prepare


def _chapters(path: Path) -> Counter[str]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return Counter(r["response"][0] for r in records if r["prompt"] != CANARY_PROMPT)


def test_members_and_non_members_mix_the_site_s_specialties_alike(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    experiment = CanaryExperiment(base_model=str(tiny_model_dir), examples_per_site=64)

    config = prepare(experiment, tmp_path, privacy={})

    members = _chapters(config.task.sites[0].path)
    held_out = _chapters(tmp_path / "held-out.jsonl")
    # The first site holds two chapters; a split by position would give each half one of them.
    assert len(members) == len(held_out) == 2
    for letter in members:
        assert abs(members[letter] - held_out[letter]) <= 20, (members, held_out)


def _records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_recipe_attack_trains_each_site_on_its_full_size_and_holds_out_unseen_records(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    federation = Federation(model=str(tiny_model_dir), num_sites=2, records_per_site=40)
    experiment = CanaryExperiment(base_model=str(tiny_model_dir), canaries=2, repeats=3)

    config = attack_config(
        federation, DpRecipe(), experiment, epsilon=8.0, held_out=10, work=tmp_path
    )

    first, second = (_records(site.path) for site in config.task.sites)
    held_out = _records(tmp_path / "held-out.jsonl")
    canaries = [r for r in first if r["prompt"] == CANARY_PROMPT]
    assert len(canaries) == 2 * 3 and all(r["prompt"] != CANARY_PROMPT for r in second)
    assert len(first) - len(canaries) == len(second) == 40 and len(held_out) == 10
    # Non-members are records no site trained on.
    trained = {(r["prompt"], r["response"]) for r in first + second}
    assert not trained & {(r["prompt"], r["response"]) for r in held_out}
    assert config.privacy.record_level and config.privacy.target_epsilon == 8.0
    assert config.train.batch_size == DpRecipe().expected_batch_size


def test_the_recipe_attack_refuses_a_first_site_too_small_to_hold_records_out(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Ophthalmology (chapter 7) holds about 2,600 billable codes.
    federation = Federation(
        model=str(tiny_model_dir), num_sites=1, records_per_site=2500, chapters=("7",)
    )
    experiment = CanaryExperiment(base_model=str(tiny_model_dir))

    with pytest.raises(ValueError, match=r"ophthalmology: .* 500 held out"):
        attack_config(federation, DpRecipe(), experiment, epsilon=None, held_out=500, work=tmp_path)


def test_the_recipe_attack_refuses_more_non_members_than_members(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    federation = Federation(model=str(tiny_model_dir), num_sites=2, records_per_site=40)
    experiment = CanaryExperiment(base_model=str(tiny_model_dir))

    with pytest.raises(ValueError, match=r"held_out must be between 1 and records_per_site \(40\)"):
        attack_config(federation, DpRecipe(), experiment, epsilon=None, held_out=41, work=tmp_path)
