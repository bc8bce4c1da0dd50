"""Fixed-point quantization into Z_(2^32): exact ring sums, bounded decoding error, no overflow."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsilo.privacy.secagg.quantize import (
    Quantization,
    dequantize,
    plan_quantization,
    quantize,
    resolution,
    ring_sum,
    to_signed,
)

floats = st.floats(-2.0, 2.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    inputs=st.integers(1, 12).flatmap(
        lambda n: st.lists(hnp.arrays(np.float32, 16, elements=floats), min_size=n, max_size=n)
    )
)
def test_ring_sum_decodes_to_the_sum_of_clipped_inputs(inputs: list[np.ndarray]) -> None:
    q = plan_quantization(clip=1.0, contributors=len(inputs))

    total = dequantize(ring_sum([quantize(x, q) for x in inputs]), q)

    clipped = sum(np.clip(x.astype(np.float64), -1.0, 1.0) for x in inputs)
    assert np.max(np.abs(total - clipped)) <= resolution(q) + 1e-12


@settings(max_examples=60, deadline=None)
@given(
    inputs=st.integers(1, 12).flatmap(
        lambda n: st.lists(hnp.arrays(np.float32, 16, elements=floats), min_size=n, max_size=n)
    )
)
def test_ring_sum_is_the_integer_sum_bit_for_bit(inputs: list[np.ndarray]) -> None:
    q = plan_quantization(clip=1.0, contributors=len(inputs))
    words = [quantize(x, q) for x in inputs]

    integer_sum = sum(to_signed(w) for w in words)

    np.testing.assert_array_equal(to_signed(ring_sum(words)), integer_sum)


def test_extreme_inputs_at_the_bound_do_not_wrap() -> None:
    n = 10
    q = plan_quantization(clip=0.5, contributors=n)
    top = [quantize(np.full(4, 100.0), q) for _ in range(n)]
    bottom = [quantize(np.full(4, -100.0), q) for _ in range(n)]

    np.testing.assert_allclose(dequantize(ring_sum(top), q), n * 0.5, atol=resolution(q))
    np.testing.assert_allclose(dequantize(ring_sum(bottom), q), -n * 0.5, atol=resolution(q))


def test_noise_headroom_shrinks_the_scale() -> None:
    plain = plan_quantization(clip=1.0, contributors=4)
    noisy = plan_quantization(clip=1.0, contributors=4, noise_std_sum=2.0)

    assert noisy.scale < plain.scale
    assert noisy.scale * (4 + 12 * 2.0) <= 2**31 - 1


def test_a_scale_that_would_overflow_is_refused() -> None:
    with pytest.raises(ValueError, match="overflows"):
        Quantization(clip=1.0, scale=2.0**30, contributors=4)


def test_negative_values_wrap_to_twos_complement() -> None:
    q = plan_quantization(clip=1.0, contributors=1)

    words = quantize(np.array([-1.0 / q.scale, 0.0]), q)

    assert words.dtype == np.uint32
    assert list(words) == [2**32 - 1, 0]
