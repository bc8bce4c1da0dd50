"""Pairwise and self masks over Z_(2^32) (Bonawitz et al. 2017, section 4).

Site ``u`` sends ``y_u = x_u + PRG(b_u) + sum over peers v of sign(u, v) * PRG(k_uv)`` where
``b_u`` is its fresh self-mask seed, ``k_uv = agree(s_u, S_v)`` the key it shares with ``v``
(both ends derive it), and ``sign(u, v)`` is +1 if ``u < v`` (by name) else -1, so the pairwise
masks of every pair cancel in the sum. The server removes what does not cancel: each survivor's
``PRG(b_u)`` (from the shares of ``b_u``) and, for each site that dropped after the key share,
its masks with every survivor (from the shares of its mask key ``s_d``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedsilo.crypto import AgreementKey, agree, expand_mask
from fedsilo.privacy.secagg.quantize import RING_DTYPE


@dataclass(frozen=True)
class SessionId:
    """One attempt of one round of one run: every derived key is bound to it."""

    federation_id: str
    run_id: str
    round: int
    attempt: int

    def context(self, label: str, *names: str) -> bytes:
        """Domain-separated bytes naming this session, a purpose and the parties."""
        parts = ["fedsilo/secagg/v1", label, self.federation_id, self.run_id]
        parts += [str(self.round), str(self.attempt), *names]
        return "\n".join(parts).encode("utf-8")

    def key(self) -> str:
        """A compact text form, for matching a site's stored secrets to a request."""
        return f"{self.federation_id}/{self.run_id}/{self.round}/{self.attempt}"


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def pairwise_mask(
    session: SessionId, own: str, own_key: AgreementKey, peer: str, peer_public: bytes, count: int
) -> np.ndarray:
    """``sign(own, peer) * PRG(k_own,peer)`` as uint32 words (negation wraps modulo 2^32)."""
    key = agree(own_key, peer_public, context=session.context("mask", *_pair(own, peer)))
    mask: np.ndarray = expand_mask(key, count)
    if own < peer:
        return mask
    negated: np.ndarray = np.negative(mask)  # uint32 negation wraps: 2^32 - m
    return negated


def mask_input(
    words: np.ndarray,
    *,
    session: SessionId,
    site: str,
    self_seed: bytes,
    mask_key: AgreementKey,
    peers: Mapping[str, bytes],
) -> np.ndarray:
    """``y_u``: the quantized input plus its self mask and its pairwise masks with ``peers``."""
    count = len(words)
    masked = np.asarray(words, dtype=RING_DTYPE) + expand_mask(self_seed, count)
    for peer, public in sorted(peers.items()):
        if peer != site:
            masked += pairwise_mask(session, site, mask_key, peer, public, count)
    result: np.ndarray = masked
    return result


def unmask_sum(
    masked_sum: np.ndarray,
    *,
    session: SessionId,
    self_seeds: Mapping[str, bytes],
    dropped_keys: Mapping[str, AgreementKey],
    survivor_publics: Mapping[str, bytes],
) -> np.ndarray:
    """The sum of the survivors' inputs from the sum of their masked inputs.

    ``self_seeds``: the reconstructed ``b_u`` of every survivor; ``dropped_keys``: the
    reconstructed mask key of every site that shared keys but sent no masked input;
    ``survivor_publics``: every survivor's advertised mask public key.
    """
    count = len(masked_sum)
    total = np.array(masked_sum, dtype=RING_DTYPE, copy=True)
    for seed in self_seeds.values():
        total -= expand_mask(seed, count)
    for dropped, key in sorted(dropped_keys.items()):
        for survivor, public in sorted(survivor_publics.items()):
            # The survivor's y holds sign(survivor, dropped) * PRG(k); the dropped site's view of
            # the same pair has the opposite sign, so adding its mask removes the survivor's.
            total += pairwise_mask(session, dropped, key, survivor, public, count)
    return total
