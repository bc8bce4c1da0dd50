"""The canary experiment's members and non-members are draws from the same records."""

import json
from collections import Counter
from pathlib import Path

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
