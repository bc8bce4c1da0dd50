"""The server's last step: rebuild the secrets it is owed and remove the masks from the sum.

For each survivor the self-mask seed is rebuilt from ``threshold`` shares and checked against
the commitment in its advertisement; for each site that dropped after the key share, its mask
key is rebuilt and checked against its advertised public key. A share that does not fit makes
the round fail loudly (naming the site), never a wrong sum.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from fedsilo.crypto import agreement_key_from_bytes, agreement_public_bytes
from fedsilo.privacy.secagg.masking import SessionId, unmask_sum
from fedsilo.privacy.secagg.messages import Advertisement, UnmaskReply
from fedsilo.privacy.secagg.quantize import ring_sum
from fedsilo.privacy.secagg.shamir import ShamirError, Share, combine


class RecoveryError(RuntimeError):
    """The sum cannot be unmasked (too few or inconsistent shares); names the site."""


def _rebuild(site: str, points: list[tuple[int, bytes]], threshold: int, what: str) -> bytes:
    try:
        return combine([Share.from_bytes(x, y) for x, y in points], threshold=threshold)
    except ShamirError as error:
        raise RecoveryError(f"cannot rebuild the {what} of {site}: {error}") from None


def recover_sum(
    *,
    session: SessionId,
    threshold: int,
    adverts: Mapping[str, Advertisement],
    masked: Mapping[str, np.ndarray],
    replies: Mapping[str, UnmaskReply],
    dropped: set[str],
) -> np.ndarray:
    """The exact ring sum of the survivors' (``masked``'s sites') quantized inputs."""
    if len(replies) < threshold:
        raise RecoveryError(f"{len(replies)} sites sent unmasking shares; {threshold} are needed")
    seeds: dict[str, bytes] = {}
    for site in masked:
        points = [reply.self_seed_shares[site] for reply in replies.values()]
        seed = _rebuild(site, points, threshold, "self-mask seed")
        if hashlib.sha256(seed).digest() != adverts[site].self_seed_sha256:
            raise RecoveryError(
                f"the rebuilt self-mask seed of {site} does not match its commitment"
            )
        seeds[site] = seed
    keys = {}
    for site in sorted(dropped):
        points = [reply.mask_key_shares[site] for reply in replies.values()]
        key = agreement_key_from_bytes(_rebuild(site, points, threshold, "mask key"))
        if agreement_public_bytes(key) != adverts[site].mask_public:
            raise RecoveryError(f"the rebuilt mask key of {site} does not match its advertised key")
        keys[site] = key
    return unmask_sum(
        ring_sum(list(masked.values())),
        session=session,
        self_seeds=seeds,
        dropped_keys=keys,
        survivor_publics={site: adverts[site].mask_public for site in masked},
    )
