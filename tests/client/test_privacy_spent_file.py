"""A site's record of released DP events: a damaged record is refused naming the file and the
entry, so the site refuses to train rather than guess what it has spent."""

from pathlib import Path

import pytest

from fedsilo.client.privacy_budget import read_spent, record_spent
from fedsilo.privacy.events import PoissonGaussianEvent


def _event() -> PoissonGaussianEvent:
    return PoissonGaussianEvent(sampling_rate=0.01, noise_multiplier=1.0, steps=10)


def test_recorded_events_read_back(tmp_path: Path) -> None:
    path = tmp_path / "privacy-spent.json"
    record_spent(path, run_id="run", round_number=1, event=_event())
    record_spent(path, run_id="run", round_number=2, event=_event())

    assert read_spent(path) == [_event(), _event()]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("{broken", "not a JSON list of released DP events"),
        ('{"event": {}}', "not a JSON list of released DP events"),
        ('[{"round": 1}]', "entry 0 is not an object with an 'event'"),
        ('[{"event": {"kind": "laplace"}}]', "entry 0 holds no valid DP event"),
    ],
)
def test_a_damaged_record_is_refused_naming_the_file_and_entry(
    tmp_path: Path, text: str, named: str
) -> None:
    path = tmp_path / "privacy-spent.json"
    path.write_text(text)

    with pytest.raises(ValueError, match=named) as raised:
        read_spent(path)
    assert str(path) in str(raised.value)
    with pytest.raises(ValueError, match=named):
        record_spent(path, run_id="run", round_number=3, event=_event())
    assert path.read_text() == text  # nothing recorded over a record it cannot read
