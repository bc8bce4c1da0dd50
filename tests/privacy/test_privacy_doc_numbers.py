"""The noise figures quoted in docs/privacy.md and docs/privacy-for-compliance.md, recomputed."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest

from fedsilo.privacy.accounting import compute_epsilon
from fedsilo.privacy.calibration import calibrate_noise_multiplier
from fedsilo.privacy.events import SampledSitesGaussianEvent

DOCS = Path(__file__).resolve().parents[2] / "docs"


# A PLD calibration takes seconds; several checks quote the same one.
@functools.cache
def _calibrated(records: int, batch: int, steps: int, epsilon: float, accountant: str) -> float:
    """The noise multiplier fedsilo calibrates (default tolerance, as the runs do)."""
    assert accountant in ("rdp", "pld")
    return calibrate_noise_multiplier(
        target_epsilon=epsilon,
        delta=1e-5,
        sampling_rate=batch / records,
        steps=steps,
        accountant="pld" if accountant == "pld" else "rdp",
    )


@pytest.mark.parametrize(
    ("records", "batch", "steps", "epsilon", "accountant", "noise", "quoted"),
    [
        (2000, 32, 112, 8.0, "rdp", "0.555", "z = 0.555, noise 0.017 · C"),
        (2000, 128, 28, 8.0, "rdp", "0.672", "z = 0.672, noise 0.005 · C"),
        (2000, 32, 112, 3.0, "rdp", "0.80", "at epsilon 3: z = 0.80 and"),
        (2000, 128, 28, 3.0, "rdp", "1.05", "z = 0.80 and 1.05"),
        (20000, 32, 112, 8.0, "rdp", "0.40", "still 0.40 with 20,000"),
        (2000, 32, 112, 8.0, "pld", "0.523", "to z = 0.523 at"),
        (2000, 32, 112, 3.0, "pld", "0.734", "(z = 0.734 against 0.797 at"),
        (2000, 32, 112, 3.0, "rdp", "0.797", "against 0.797 at"),
    ],
)
def test_noise_multipliers_quoted_in_the_recipe_section(
    records: int,
    batch: int,
    steps: int,
    epsilon: float,
    accountant: str,
    noise: str,
    quoted: str,
) -> None:
    z = _calibrated(records, batch, steps, epsilon, accountant)

    # Exact to the digits quoted.
    decimals = len(noise.split(".")[1])
    assert f"{z:.{decimals}f}" == noise
    assert quoted in (DOCS / "privacy.md").read_text()
    if "noise" in quoted:  # the noise on each averaged gradient, z * C / batch, as quoted
        assert f"noise {z / batch:.3f} · C" in quoted


@pytest.mark.parametrize(
    ("records", "batch", "steps", "noise", "quoted"),
    [
        (2000, 128, 112, "0.0065", "noise 0.0065 · C at batch 128 over 112"),
        (2000, 1000, 56, "0.0026", "0.0026 · C at batch 1,000 over 56 steps (28 epochs)"),
        (20000, 1000, 200, "0.0008", "reaches 0.0008 · C in 10 epochs at batch 1,000"),
        (20000, 2000, 100, "0.0005", "and 0.0005 · C at batch 2,000"),
    ],
)
def test_noise_per_step_quoted_against_site_size_and_compute(
    records: int, batch: int, steps: int, noise: str, quoted: str
) -> None:
    z = _calibrated(records, batch, steps, 8.0, "rdp")

    assert f"{z / batch:.4f}" == noise
    assert quoted in (DOCS / "privacy.md").read_text()


def test_the_pld_accountant_saving_quoted_in_the_recipe_section() -> None:
    rdp, pld = (_calibrated(2000, 32, 112, 8.0, name) for name in ("rdp", "pld"))

    assert round(100 * (1 - pld / rdp)) == 6
    assert "would lower it by about 6%" in (DOCS / "privacy.md").read_text()


def test_site_level_noise_for_epsilon_8_over_10_rounds_is_about_2() -> None:
    def epsilon(z: float) -> float:
        return compute_epsilon([SampledSitesGaussianEvent(z, 4, 4, 10)], delta=1e-5)

    assert epsilon(2.01) > 8.0 > epsilon(2.02)
    assert f"{epsilon(2.0):.2f}" == "8.08"
    page = (DOCS / "privacy-for-compliance.md").read_text()
    assert "the accountant needs z of about 2 (2.02 at delta 1e-5" in page
    assert "z = 2.0 gives epsilon 8.08" in page
    # The table's ratio column: noise norm over update norm = z * sqrt(d) / n, d = 2.4 million.
    assert round(2.0 * math.sqrt(2.4e6) / 4) == 775
    assert "| 4 | 0.5 | about 775 |" in page
