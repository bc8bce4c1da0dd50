"""The server's last step: rebuild the secrets it is owed and remove the masks from the sum.

For each survivor the self-mask seed is rebuilt from ``threshold`` shares and checked against
the commitment in its advertisement; for each site that dropped after the key share, its mask
key is rebuilt and checked against its advertised public key. Those checks also make the
rebuild robust: a wrong share cannot stop it. When the first ``threshold`` shares do not
rebuild the committed secret, other subsets of ``threshold`` shares are tried, leaving out
first the holders whose shares were off before, until one does; the polynomial that subset
defines then shows which shares are off it. A wrong subset cannot pass the check (it would need
a SHA-256 preimage or an X25519 key for a given public key), so the sum is exact whenever it is
returned.

A share off the polynomial was either sent wrong by its holder or dealt wrong by the secret's
owner: the server cannot tell which, so both are reported, never a verdict. One wrong share
never lies on a polynomial with the right secret; two or more wrong shares made to fit together
can make honest shares look off it, though never change the sum. The rebuild fails loudly,
naming the owner, only when no subset fits (fewer than ``threshold`` right shares arrived) or
the search bound is reached.
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
from fedsilo.privacy.secagg.shamir import (
    ShamirError,
    Share,
    combine,
    evaluate,
    polynomial_through,
)

# Subsets of shares tried for one secret before giving up: bounds the work that many wrong
# shares can cause. With L wrong shares among the first ``threshold`` of n, at most
# sum_{e <= L} C(threshold + e, e) subsets are tried: threshold + 2 for one, and none after the
# first secret for a holder already found off.
MAX_SUBSETS = 4096

# owner -> holders whose share of the owner's secret is off the polynomial the others fit.
OffPolynomial = dict[str, list[str]]


class RecoveryError(RuntimeError):
    """The sum cannot be unmasked (too few right shares); names the owner.

    ``off_polynomial``: the shares found off their polynomial before the failure.
    """

    def __init__(self, message: str, off_polynomial: OffPolynomial | None = None) -> None:
        super().__init__(message)
        self.off_polynomial: OffPolynomial = dict(off_polynomial or {})


@dataclass(frozen=True)
class Recovery:
    """The exact ring sum of the survivors' inputs, and the shares that did not fit.

    ``off_polynomial`` maps a site to the holders whose share of its secret is not on the
    polynomial that ``threshold`` other shares and the site's commitment agree on: sent wrong
    by the holder or dealt wrong by the site.
    """

    total: np.ndarray
    off_polynomial: OffPolynomial = field(default_factory=dict)


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
    ``fits``: the check against the owner's commitment; ``suspects``: holders whose shares
    were off before, left out first.
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
        # Leaving out e of the first threshold + e shares reaches every subset that leaving
        # out e of all of them does (the rest only pick the same first threshold again).
        window = order[: threshold + left_out_count]
        for left_out in combinations(window, left_out_count):
            chosen = tuple(holder for holder in window if holder not in left_out)
            if chosen in tried:
                continue
            if len(tried) >= MAX_SUBSETS:
                raise RecoveryError(
                    f"cannot rebuild the {what} of {owner}: none of {MAX_SUBSETS} subsets of "
                    f"{threshold} of its {len(order)} shares fits its commitment"
                )
            tried.add(chosen)
            subset = [shares[holder] for holder in chosen]
            try:
                secret = combine(subset, threshold=threshold)
            except ShamirError:
                continue
            if fits(secret):
                # Once per secret: the polynomial, to check every other share in O(threshold).
                coefficients = polynomial_through(subset)
                wrong += [
                    holder
                    for holder, share in shares.items()
                    if evaluate(coefficients, share.x) != share.y
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
    off: OffPolynomial = {}

    def rebuild(
        owner: str,
        what: str,
        points: Mapping[str, tuple[int, bytes]],
        fits: Callable[[bytes], bool],
    ) -> bytes:
        suspects = {holder for holders in off.values() for holder in holders}
        try:
            secret, wrong = _rebuild(
                owner, what, points, x_of=x_of, threshold=threshold, fits=fits, suspects=suspects
            )
        except RecoveryError as error:
            raise RecoveryError(str(error), off) from None
        if wrong:
            off[owner] = wrong
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
    return Recovery(total, off)
