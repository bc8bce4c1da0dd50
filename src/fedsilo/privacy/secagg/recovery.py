"""The server's last step: rebuild the secrets it is owed and remove the masks from the sum.

For each survivor the self-mask seed is rebuilt from ``threshold`` shares and checked against
the commitment in its advertisement; for each site that dropped after the key share, its mask
key is rebuilt and checked against its advertised public key. Those checks also make the
rebuild robust: a holder that sends a wrong share cannot stop it. When the first ``threshold``
shares do not rebuild the committed secret, other subsets of ``threshold`` shares are tried,
leaving out the holders already caught first, until one does; the polynomial that subset
defines then shows which shares do not fit, and their holders are named. A wrong subset cannot
pass the check (it would need a SHA-256 preimage or an X25519 key for a given public key). The
rebuild fails loudly, naming the site, only when no subset fits: the owner dealt shares that
are not on one polynomial, or more than ``len(replies) - threshold`` holders lied; never a
wrong sum.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from fedsilo.crypto import agreement_key_from_bytes, agreement_public_bytes
from fedsilo.privacy.secagg.masking import SessionId, unmask_sum
from fedsilo.privacy.secagg.messages import Advertisement, UnmaskReply
from fedsilo.privacy.secagg.quantize import ring_sum
from fedsilo.privacy.secagg.shamir import ShamirError, Share, combine, interpolate

# Subsets of shares tried for one secret before giving up: bounds the work that many wrong
# shares can cause (one liar among n holders costs at most n + 1 tries, and none after the
# first secret once it is caught).
MAX_SUBSETS = 4096


class RecoveryError(RuntimeError):
    """The sum cannot be unmasked (too few or inconsistent shares); names the site."""


@dataclass(frozen=True)
class Recovery:
    """The exact ring sum of the survivors' inputs, and who sent shares that did not fit.

    ``wrong_shares`` maps a holder to the sites whose secret it sent a share of that is not on
    the polynomial the other holders' shares agree on (its own lie, or a bad share its owner
    dealt it: the server cannot tell which). One wrong share never lies on a polynomial with
    the right secret, so a single liar is named exactly; two or more liars who coordinate their
    shares can make an honest holder's share look wrong, though never change the sum.
    """

    total: np.ndarray
    wrong_shares: dict[str, list[str]] = field(default_factory=dict)


def _rebuild(
    owner: str,
    what: str,
    points: Mapping[str, tuple[int, bytes]],
    *,
    x_of: Mapping[str, int],
    threshold: int,
    fits: Callable[[bytes], bool],
    suspects: set[str],
) -> tuple[bytes, list[str]]:
    """``owner``'s secret from the holders' ``points``, and the holders whose point is wrong.

    ``x_of``: the x every holder's share must have (its 1-based place in the dealt cohort);
    ``fits``: the check against the owner's commitment; ``suspects``: holders caught before,
    left out first.
    """
    shares: dict[str, Share] = {}
    wrong: list[str] = []
    for holder, (x, y) in sorted(points.items()):
        try:
            if x != x_of.get(holder):
                raise ShamirError(f"x = {x}, not {x_of.get(holder)}")
            shares[holder] = Share.from_bytes(x, y)
        except ShamirError:
            wrong.append(holder)
    order = sorted(shares, key=lambda holder: (holder in suspects, holder))
    spare = len(order) - threshold
    if spare < 0:
        raise RecoveryError(
            f"cannot rebuild the {what} of {owner}: {len(order)} well-formed shares, "
            f"{threshold} are needed"
        )
    tried: set[tuple[str, ...]] = set()
    for left_out_count in range(spare + 1):
        for left_out in combinations(order, left_out_count):
            chosen = tuple(holder for holder in order if holder not in left_out)[:threshold]
            if chosen in tried:
                continue
            if len(tried) >= MAX_SUBSETS:
                raise RecoveryError(
                    f"cannot rebuild the {what} of {owner}: none of {MAX_SUBSETS} subsets of "
                    f"{threshold} of its {len(order)} shares fits its commitment"
                )
            tried.add(chosen)
            polynomial = [shares[holder] for holder in chosen]
            try:
                secret = combine(polynomial, threshold=threshold)
            except ShamirError:
                continue
            if fits(secret):
                wrong += [
                    holder
                    for holder, share in shares.items()
                    if interpolate(polynomial, share.x) != share.y
                ]
                return secret, sorted(wrong)
    raise RecoveryError(
        f"no {threshold} of the {len(order)} shares of the {what} of {owner} rebuild the secret "
        f"its advertisement commits to: {owner} dealt shares that are not on one polynomial, or "
        f"more than {spare} of their holders sent wrong ones"
    )


def _seed_fits(advert: Advertisement) -> Callable[[bytes], bool]:
    return lambda seed: hashlib.sha256(seed).digest() == advert.self_seed_sha256


def _key_fits(advert: Advertisement) -> Callable[[bytes], bool]:
    return lambda key: agreement_public_bytes(agreement_key_from_bytes(key)) == advert.mask_public


def recover_sum(
    *,
    session: SessionId,
    threshold: int,
    adverts: Mapping[str, Advertisement],
    masked: Mapping[str, np.ndarray],
    replies: Mapping[str, UnmaskReply],
    dropped: set[str],
) -> Recovery:
    """The exact ring sum of the survivors' (``masked``'s sites') quantized inputs.

    ``adverts`` holds every site the shares were dealt over (each dealer split its secrets over
    this cohort in name order, so a holder's share has its 1-based place as x).
    """
    if len(replies) < threshold:
        raise RecoveryError(f"{len(replies)} sites sent unmasking shares; {threshold} are needed")
    x_of = {name: place for place, name in enumerate(sorted(adverts), start=1)}
    caught: dict[str, list[str]] = {}

    def rebuild(
        owner: str,
        what: str,
        points: Mapping[str, tuple[int, bytes]],
        fits: Callable[[bytes], bool],
    ) -> bytes:
        secret, wrong = _rebuild(
            owner, what, points, x_of=x_of, threshold=threshold, fits=fits, suspects=set(caught)
        )
        for holder in wrong:
            caught.setdefault(holder, []).append(owner)
        return secret

    seeds: dict[str, bytes] = {}
    for site in sorted(masked):
        points = {holder: reply.self_seed_shares[site] for holder, reply in replies.items()}
        seeds[site] = rebuild(site, "self-mask seed", points, _seed_fits(adverts[site]))
    keys = {}
    for site in sorted(dropped):
        points = {holder: reply.mask_key_shares[site] for holder, reply in replies.items()}
        secret = rebuild(site, "mask key", points, _key_fits(adverts[site]))
        keys[site] = agreement_key_from_bytes(secret)
    total = unmask_sum(
        ring_sum(list(masked.values())),
        session=session,
        self_seeds=seeds,
        dropped_keys=keys,
        survivor_publics={site: adverts[site].mask_public for site in masked},
    )
    return Recovery(total, caught)
