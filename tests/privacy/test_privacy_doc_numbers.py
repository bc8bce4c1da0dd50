"""The noise figures quoted in docs/privacy.md and docs/privacy-for-compliance.md, recomputed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedsilo.privacy.accounting import compute_epsilon
from fedsilo.privacy.calibration import calibrate_noise_multiplier
from fedsilo.privacy.events import SampledSitesGaussianEvent

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize(
    ("records", "batch", "steps", "epsilon", "noise", "quoted"),
    [
        (96, 8, 16, 8.0, 0.68, "z = 0.68, noise 0.085 · C"),
        (2000, 256, 16, 8.0, 0.77, "z = 0.77 at epsilon 8, noise 0.003 · C"),
        (2000, 256, 16, 3.0, 1.29, "0.005 · C at epsilon 3"),
        (2000, 256, 16, 1.0, 2.57, "0.010 · C at\nepsilon 1"),
    ],
)
def test_record_level_noise_in_the_recipe_section(
    records: int, batch: int, steps: int, epsilon: float, noise: float, quoted: str
) -> None:
    z = calibrate_noise_multiplier(
        target_epsilon=epsilon, delta=1e-5, sampling_rate=batch / records, steps=steps
    )

    assert z == pytest.approx(noise, abs=0.01)
    assert quoted in (DOCS / "privacy.md").read_text()
    assert f"{z / batch:.3f} · C" in quoted


def test_site_level_noise_for_epsilon_8_over_10_rounds_is_about_2() -> None:
    def epsilon(z: float) -> float:
        return compute_epsilon([SampledSitesGaussianEvent(z, 4, 4, 10)], delta=1e-5)

    assert epsilon(2.0) > 8.0 > epsilon(2.05)
    page = (DOCS / "privacy-for-compliance.md").read_text()
    assert "the accountant needs z = 2.0 (delta 1e-5)" in page
    # The table's ratio column: noise norm over update norm = z * sqrt(d) / n, d = 2.4 million.
    assert round(2.0 * math.sqrt(2.4e6) / 4) == 775
    assert "| 4 | 0.5 | about 775 |" in page
