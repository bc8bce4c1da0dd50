"""Shamir sharing over GF(2^521 - 1): reconstruction from any threshold, not from fewer."""

import itertools
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.privacy.secagg.shamir import (
    PRIME,
    ShamirError,
    Share,
    combine,
    evaluate,
    polynomial_through,
    secret_bytes,
    split,
)


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    count=st.integers(1, 8),
    data=st.data(),
)
def test_any_threshold_subset_reconstructs(secret: bytes, count: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(1, count))
    shares = split(secret, threshold=threshold, count=count)
    subset = data.draw(st.permutations(shares)).copy()[:threshold]

    assert combine(subset, threshold=threshold) == secret


def test_every_subset_of_threshold_size_agrees() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, threshold=3, count=5)

    for subset in itertools.combinations(shares, 3):
        assert combine(list(subset), threshold=3) == secret


def test_fewer_than_threshold_is_refused() -> None:
    shares = split(secrets.token_bytes(32), threshold=3, count=5)

    with pytest.raises(ShamirError, match="3 are needed"):
        combine(shares[:2], threshold=3)


def test_threshold_minus_one_shares_fit_every_secret() -> None:
    # Perfect secrecy, concretely: for two shares of a degree-2 sharing, any candidate secret
    # has a polynomial through them, so the shares rule nothing out.
    shares = split(bytes(32), threshold=3, count=3)[:2]
    candidate = int.from_bytes(b"\xff" * 32, "big")
    (x1, y1), (x2, y2) = (shares[0].x, shares[0].y), (shares[1].x, shares[1].y)
    # Solve f(x) = candidate + a x + b x^2 through (x1, y1), (x2, y2) over the field.
    det = (x1 * x2 * x2 - x2 * x1 * x1) % PRIME
    a = ((y1 - candidate) * x2 * x2 - (y2 - candidate) * x1 * x1) * pow(det, -1, PRIME) % PRIME
    b = ((y2 - candidate) * x1 - (y1 - candidate) * x2) * pow(det, -1, PRIME) % PRIME
    forged = [Share(x, (candidate + a * x + b * x * x) % PRIME) for x in (x1, x2, 3)]

    assert forged[:2] == shares
    assert combine(forged, threshold=3) == b"\xff" * 32


def test_conflicting_duplicate_points_are_refused() -> None:
    shares = split(secrets.token_bytes(32), threshold=2, count=3)

    with pytest.raises(ShamirError, match="x = 1"):
        combine([shares[0], Share(1, (shares[0].y + 1) % PRIME), shares[1]], threshold=2)


def test_share_bytes_round_trip_and_range_check() -> None:
    share = split(secrets.token_bytes(32), threshold=2, count=2)[1]

    assert Share.from_bytes(share.x, share.to_bytes()) == share
    with pytest.raises(ShamirError):
        Share.from_bytes(0, share.to_bytes())
    with pytest.raises(ShamirError):
        Share.from_bytes(1, b"\x00" * 65)


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    count=st.integers(1, 9),
    data=st.data(),
)
def test_the_polynomial_through_any_threshold_shares_passes_through_all(
    secret: bytes, count: int, data: st.DataObject
) -> None:
    threshold = data.draw(st.integers(1, count))
    shares = split(secret, threshold=threshold, count=count)
    subset = data.draw(st.permutations(shares)).copy()[:threshold]

    coefficients = polynomial_through(subset)

    assert len(coefficients) == threshold
    assert secret_bytes(coefficients[0]) == secret
    assert [evaluate(coefficients, share.x) for share in shares] == [s.y for s in shares]


def test_a_share_off_the_polynomial_is_seen() -> None:
    shares = split(bytes(32), threshold=3, count=5)
    coefficients = polynomial_through(shares[:3])
    off = Share(shares[4].x, (shares[4].y + 1) % PRIME)

    assert evaluate(coefficients, off.x) != off.y
