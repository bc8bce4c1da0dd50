"""Distributed DP: noise shares that sum to at least the target, whatever the dropouts."""

import math

import numpy as np
import pytest

from fedsilo.privacy.distributed_dp import (
    clip_l2,
    noise_share_std,
    rounded_gaussian,
    secure_generator,
)
from fedsilo.privacy.secagg.messages import SecAggParams
from fedsilo.privacy.secagg.quantize import dequantize, quantize, ring_sum


def test_threshold_shares_carry_exactly_the_target_variance() -> None:
    std = noise_share_std(noise_multiplier=1.2, clip_norm=0.5, threshold=4)

    assert math.isclose(4 * std**2, (1.2 * 0.5) ** 2)


@pytest.mark.parametrize("contributors", [3, 5])
def test_summed_ring_noise_has_the_planned_std(contributors: int) -> None:
    # 5 sites, threshold 3: any 3..5 contributors give std z*S*sqrt(k/t) >= z*S.
    params = SecAggParams(
        threshold=3, cohort_size=5, clip=1.0, dp_clip_norm=0.5, dp_noise_multiplier=1.0
    )
    q = params.quantization()
    std = noise_share_std(noise_multiplier=1.0, clip_norm=0.5, threshold=3)
    zero = quantize(np.zeros(200_000), q)
    generator = np.random.default_rng(7)
    noisy = [
        zero + rounded_gaussian(len(zero), std=std * q.scale, generator=generator).astype(np.uint32)
        for _ in range(contributors)
    ]

    total = dequantize(ring_sum(noisy), q)

    expected = 1.0 * 0.5 * math.sqrt(contributors / 3)
    assert abs(float(total.std()) / expected - 1) < 0.01
    assert abs(float(total.mean())) < 0.01
    assert float(total.std()) >= 0.5 * 0.99


def test_clip_l2_scales_only_large_vectors() -> None:
    big, small = np.array([3.0, 4.0]), np.array([0.3, 0.4])

    np.testing.assert_allclose(clip_l2(big, clip_norm=1.0), [0.6, 0.8])
    np.testing.assert_array_equal(clip_l2(small, clip_norm=1.0), small)


def test_secure_generators_differ() -> None:
    assert secure_generator().integers(2**62) != secure_generator().integers(2**62)


def test_noise_headroom_keeps_the_sum_from_wrapping() -> None:
    params = SecAggParams(
        threshold=2, cohort_size=3, clip=1.0, dp_clip_norm=1.0, dp_noise_multiplier=2.0
    )
    q = params.quantization()

    assert q.scale * (3 * 1.0 + 12 * params.noise_std_sum()) <= 2**31 - 1
