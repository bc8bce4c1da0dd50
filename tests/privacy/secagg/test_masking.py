"""Pairwise and self masks: they hide each input and cancel exactly, with or without dropouts."""

import secrets

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.crypto import agreement_public_bytes, generate_agreement_key
from fedsilo.privacy.secagg.masking import SessionId, mask_input, unmask_sum
from fedsilo.privacy.secagg.quantize import ring_sum

SESSION = SessionId("fed", "run", 1, 1)


def _masked(sites: list[str], inputs: dict[str, np.ndarray], peers_of: list[str]) -> tuple:
    keys = {s: generate_agreement_key() for s in sites}
    publics = {s: agreement_public_bytes(k) for s, k in keys.items()}
    seeds = {s: secrets.token_bytes(32) for s in sites}
    peers = {s: publics[s] for s in peers_of}
    masked = {
        s: mask_input(
            inputs[s], session=SESSION, site=s, self_seed=seeds[s], mask_key=keys[s], peers=peers
        )
        for s in sites
        if s in inputs
    }
    return keys, publics, seeds, masked


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 7),
    length=st.integers(1, 40),
    data=st.data(),
)
def test_unmasked_sum_of_survivors_is_bit_exact(n: int, length: int, data: st.DataObject) -> None:
    sites = [f"site-{i}" for i in range(n)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    inputs = {s: rng.integers(0, 2**32, length, dtype=np.uint64).astype(np.uint32) for s in sites}
    survivors = data.draw(st.lists(st.sampled_from(sites), min_size=1, unique=True))
    dropped = [s for s in sites if s not in survivors]
    keys, publics, seeds, masked = _masked(sites, {s: inputs[s] for s in survivors}, peers_of=sites)

    total = unmask_sum(
        ring_sum(list(masked.values())),
        session=SESSION,
        self_seeds={s: seeds[s] for s in survivors},
        dropped_keys={d: keys[d] for d in dropped},
        survivor_publics={s: publics[s] for s in survivors},
    )

    np.testing.assert_array_equal(total, ring_sum([inputs[s] for s in survivors]))


def test_a_masked_input_looks_nothing_like_the_input() -> None:
    sites = ["a", "b", "c"]
    inputs = {s: np.zeros(4096, dtype=np.uint32) for s in sites}

    _, _, _, masked = _masked(sites, inputs, peers_of=sites)

    for vector in masked.values():
        assert np.count_nonzero(vector) > 4000  # all-zero input, near-uniform output
        assert abs(float(vector.mean()) / 2**32 - 0.5) < 0.02


def test_without_the_self_masks_the_sum_stays_hidden() -> None:
    sites = ["a", "b"]
    inputs = {s: np.arange(8, dtype=np.uint32) for s in sites}
    _, publics, _, masked = _masked(sites, inputs, peers_of=sites)

    pairwise_only = unmask_sum(
        ring_sum(list(masked.values())),
        session=SESSION,
        self_seeds={},
        dropped_keys={},
        survivor_publics=publics,
    )

    assert not np.array_equal(pairwise_only, 2 * np.arange(8, dtype=np.uint32))


def test_another_session_gives_other_masks() -> None:
    key, seed = generate_agreement_key(), bytes(32)
    peer = agreement_public_bytes(generate_agreement_key())
    words = np.zeros(8, dtype=np.uint32)

    one = mask_input(
        words, session=SESSION, site="a", self_seed=seed, mask_key=key, peers={"b": peer}
    )
    other = mask_input(
        words,
        session=SessionId("fed", "run", 1, 2),
        site="a",
        self_seed=seed,
        mask_key=key,
        peers={"b": peer},
    )

    assert not np.array_equal(one, other)
