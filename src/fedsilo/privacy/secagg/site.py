"""The site's side of the protocol: five steps over one state that never leaves the site.

1. :func:`advertise`: fresh X25519 keys (one to receive shares, one for masks) and a fresh
   self-mask seed; the site signs the public halves.
2. :func:`share_keys`: given the cohort's advertisements (each already verified against the
   pinned identity keys), Shamir-share the seed and the mask key, ``threshold`` of
   ``len(cohort)``, and seal each peer's shares with AES-GCM under a key only the two agree on.
3. :func:`receive_shares` then :func:`mask`: open the shares the server relays, refuse if the
   cohort that could be summed is smaller than ``threshold`` or the site's ``min_cohort``, and
   mask the quantized input with every site that shared keys.
4. :func:`agree_survivors`: once, the statement naming the survivors U3 the server claims,
   for the site to sign (the consistency check, :mod:`fedsilo.privacy.secagg.consistency`).
5. :func:`unmask`: once, and only for the set the site signed, backed by ``threshold``
   verified signatures: for each survivor the self-seed share, for each dropout the mask-key
   share, never both for one site (that would unmask it).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedsilo.crypto import (
    SealError,
    agree,
    agreement_key_from_bytes,
    agreement_private_bytes,
    agreement_public_bytes,
    generate_agreement_key,
    open_sealed,
    seal,
)
from fedsilo.privacy.secagg.consistency import survivor_statement
from fedsilo.privacy.secagg.masking import SessionId, mask_input
from fedsilo.privacy.secagg.messages import (
    Advertisement,
    SecAggMessageError,
    SecAggParams,
    ShareBundle,
    UnmaskReply,
)
from fedsilo.privacy.secagg.shamir import split


class SecAggRefusedError(RuntimeError):
    """The site will not take this step; the reason reaches the server as the site's error."""


@dataclass(frozen=True)
class SiteSession:
    """Everything one site keeps between the stages of one session (secret: stays local)."""

    site: str
    session: SessionId
    params: SecAggParams
    share_key: bytes  # X25519 private, receives shares
    mask_key: bytes  # X25519 private, derives pairwise masks
    self_seed: bytes
    peers: dict[str, Advertisement] = field(default_factory=dict)  # verified advertisements
    held: dict[str, ShareBundle] = field(default_factory=dict)  # shares others gave us
    # The masked input's cohort is fixed once its shares are opened; recorded, not inferred
    # from ``held``, which sharing keys again would reset.
    input_sent: bool = False
    unmasked: bool = False
    signed_survivors: tuple[str, ...] | None = None  # the one U3 this site signed

    def advertisement(self) -> Advertisement:
        return Advertisement(
            site=self.site,
            session=self.session.key(),
            share_public=agreement_public_bytes(agreement_key_from_bytes(self.share_key)),
            mask_public=agreement_public_bytes(agreement_key_from_bytes(self.mask_key)),
            self_seed_sha256=hashlib.sha256(self.self_seed).digest(),
        )

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "site": self.site,
                "session": [
                    self.session.federation_id,
                    self.session.run_id,
                    self.session.round,
                    self.session.attempt,
                ],
                "params": self.params.to_fields(),
                "share_key": self.share_key.hex(),
                "mask_key": self.mask_key.hex(),
                "self_seed": self.self_seed.hex(),
                "peers": {name: a.to_payload().decode() for name, a in self.peers.items()},
                "held": {name: b.to_bytes().decode() for name, b in self.held.items()},
                "input_sent": self.input_sent,
                "unmasked": self.unmasked,
                "signed_survivors": self.signed_survivors,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SiteSession:
        """The session :meth:`to_bytes` stored; SecAggMessageError for anything else."""
        try:
            return cls._from_json(json.loads(raw))
        except RecursionError:
            raise SecAggMessageError("the stored session is nested too deeply") from None
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            if isinstance(error, SecAggMessageError):
                raise
            raise SecAggMessageError(
                f"the stored session does not parse ({type(error).__name__}: {error})"
            ) from None

    @classmethod
    def _from_json(cls, value: dict[str, Any]) -> SiteSession:
        federation_id, run_id, round_number, attempt = value["session"]
        if not (
            isinstance(federation_id, str)
            and isinstance(run_id, str)
            and type(round_number) is int
            and type(attempt) is int
            and isinstance(value["site"], str)
            and type(value["unmasked"]) is bool
            and type(value["input_sent"]) is bool
        ):
            raise TypeError("mistyped session, site or unmasked field")
        secret_fields = [value[name] for name in ("share_key", "mask_key", "self_seed")]
        if not all(isinstance(text, str) and len(text) == 64 for text in secret_fields):
            raise TypeError("the keys and the seed must each be 32 bytes of hex")
        session = SessionId(federation_id, run_id, round_number, attempt)
        site = value["site"]
        return cls(
            site=site,
            session=session,
            params=SecAggParams.from_fields(value["params"]),
            share_key=bytes.fromhex(value["share_key"]),
            mask_key=bytes.fromhex(value["mask_key"]),
            self_seed=bytes.fromhex(value["self_seed"]),
            peers={
                name: Advertisement.from_payload(text.encode(), site=name, session=session.key())
                for name, text in value["peers"].items()
            },
            held={
                name: ShareBundle.from_bytes(text.encode(), sender=name, recipient=site)
                for name, text in value["held"].items()
            },
            input_sent=value["input_sent"],
            unmasked=value["unmasked"],
            signed_survivors=_names(value.get("signed_survivors")),
        )


def _names(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise SecAggMessageError("the stored survivor set is not a list of site names")
    return tuple(value)


def _share_context(session: SessionId, sender: str, recipient: str) -> tuple[bytes, bytes]:
    low, high = sorted((sender, recipient))
    key_context = session.context("share-key", low, high)
    return key_context, session.context("share", sender, recipient)


def advertise(*, site: str, session: SessionId, params: SecAggParams) -> SiteSession:
    """Step 1: a new session with fresh keys and seed (a retried round gets new ones)."""
    return SiteSession(
        site=site,
        session=session,
        params=params,
        share_key=agreement_private_bytes(generate_agreement_key()),
        mask_key=agreement_private_bytes(generate_agreement_key()),
        self_seed=secrets.token_bytes(32),
    )


def share_keys(
    state: SiteSession, cohort: Mapping[str, Advertisement]
) -> tuple[SiteSession, dict[str, bytes]]:
    """Step 2: the sealed share bundle for every other site of ``cohort`` (verified adverts),
    once per session."""
    if state.peers:
        # Sharing again would hand out fresh shares of the same seed and mask key to another
        # cohort, and reset what the site holds: after a masked input over cohort A, a second
        # one over cohort B lets the server unmask the first input alone.
        raise SecAggRefusedError(f"site {state.site}: already shared its keys in this session")
    if cohort.get(state.site) != state.advertisement():
        raise SecAggRefusedError(
            f"site {state.site}: the relayed advertisements do not hold this site's own keys"
        )
    threshold = state.params.threshold
    if len(cohort) < threshold:
        raise SecAggRefusedError(
            f"site {state.site}: {len(cohort)} sites advertised keys, the threshold is {threshold}"
        )
    check_announced_cohort(state, len(cohort))
    names = sorted(cohort)
    seed_shares = split(state.self_seed, threshold=threshold, count=len(names))
    key_shares = split(state.mask_key, threshold=threshold, count=len(names))
    share_key = agreement_key_from_bytes(state.share_key)
    sealed: dict[str, bytes] = {}
    held: dict[str, ShareBundle] = {}
    for index, name in enumerate(names):
        bundle = ShareBundle(
            sender=state.site,
            recipient=name,
            x=seed_shares[index].x,
            self_seed_share=seed_shares[index].to_bytes(),
            mask_key_share=key_shares[index].to_bytes(),
        )
        if name == state.site:
            held[name] = bundle  # our own point: kept, used like any other at unmasking
            continue
        key_context, associated = _share_context(state.session, state.site, name)
        key = agree(share_key, cohort[name].share_public, context=key_context)
        sealed[name] = seal(key, bundle.to_bytes(), associated=associated)
    return replace(state, peers=dict(cohort), held=held), sealed


def check_announced_cohort(state: SiteSession, advertised: int) -> None:
    """Refuse a round whose relayed advertisements outnumber the cohort size it announced.

    Shares (or an HE key) go to every site whose keys are relayed, so the threshold must be a
    majority of those sites (``SecAggParams`` holds 2t > cohort size), not of a smaller cohort
    the coordinator announced: with t of 2t or more holders, two disjoint groups of t could
    each be told a different survivor set and each sign it, one revealing this site's
    self-mask seed and the other its mask key."""
    if advertised > state.params.cohort_size:
        raise SecAggRefusedError(
            f"site {state.site}: {advertised} sites advertised keys for a round announced "
            f"with cohort size {state.params.cohort_size} and threshold "
            f"{state.params.threshold}; the threshold must be a majority of the sites that "
            "receive shares"
        )


def _check_cohort(state: SiteSession, size: int, *, min_cohort: int, what: str) -> None:
    needed = max(state.params.threshold, min_cohort)
    if size < needed:
        raise SecAggRefusedError(
            f"site {state.site}: {what} would sum {size} sites; this site requires at least "
            f"{needed} (threshold {state.params.threshold}, policy min_cohort {min_cohort})"
        )


def receive_shares(
    state: SiteSession, sealed: Mapping[str, bytes], *, min_cohort: int
) -> SiteSession:
    """Step 3a: open the bundles the other sites of the cohort sent us (server-relayed)."""
    if state.input_sent:
        # One masked input per session: two inputs masked over different cohorts would give
        # the server two views of the same input to compare.
        raise SecAggRefusedError(f"site {state.site}: already sent its masked input")
    if not state.peers:
        raise SecAggRefusedError(f"site {state.site}: has not shared its keys in this session")
    unknown = sorted(set(sealed) - set(state.peers))
    if unknown or state.site in sealed:
        raise SecAggRefusedError(
            f"site {state.site}: relayed shares from sites that did not advertise keys: {unknown}"
        )
    _check_cohort(state, len(sealed) + 1, min_cohort=min_cohort, what="the masked input")
    share_key = agreement_key_from_bytes(state.share_key)
    held = {state.site: state.held[state.site]}
    for sender, blob in sealed.items():
        key_context, associated = _share_context(state.session, sender, state.site)
        key = agree(share_key, state.peers[sender].share_public, context=key_context)
        try:
            raw = open_sealed(key, blob, associated=associated)
            held[sender] = ShareBundle.from_bytes(raw, sender=sender, recipient=state.site)
        except (SealError, SecAggMessageError) as error:
            raise SecAggRefusedError(f"site {state.site}: shares from {sender}: {error}") from None
    return replace(state, held=held, input_sent=True)


def mask(state: SiteSession, words: np.ndarray) -> np.ndarray:
    """Step 3b: ``words`` masked with the self mask and with every site whose shares we hold."""
    peers = {name: state.peers[name].mask_public for name in state.held}
    return mask_input(
        words,
        session=state.session,
        site=state.site,
        self_seed=state.self_seed,
        mask_key=agreement_key_from_bytes(state.mask_key),
        peers=peers,
    )


def agree_survivors(
    state: SiteSession, survivors: set[str], *, min_cohort: int
) -> tuple[SiteSession, bytes]:
    """Step 4: the statement "the survivors are ``survivors``", for the site to sign, once."""
    if state.signed_survivors is not None:
        # Two signed sets would let the server show each half of the cohort another view.
        raise SecAggRefusedError(f"site {state.site}: already signed a survivor set")
    if not state.input_sent:
        raise SecAggRefusedError(f"site {state.site}: has not sent its masked input")
    if state.site not in survivors or not survivors <= set(state.held):
        raise SecAggRefusedError(
            f"site {state.site}: the survivor set must hold this site and only sites that "
            f"shared keys with it; unknown: {sorted(survivors - set(state.held))}"
        )
    _check_cohort(state, len(survivors), min_cohort=min_cohort, what="the survivor set")
    statement = survivor_statement(state.session, survivors)
    return replace(state, signed_survivors=tuple(sorted(survivors))), statement


def unmask(
    state: SiteSession,
    *,
    survivors: set[str],
    dropped: set[str],
    signers: set[str],
    min_cohort: int,
) -> tuple[SiteSession, UnmaskReply]:
    """Step 5: the shares that remove the masks of exactly ``survivors``' sum.

    ``signers``: the sites whose signatures on this session's survivor set the caller verified
    (against their pinned identity keys, over the set this site signed).
    """
    if state.unmasked:
        raise SecAggRefusedError(f"site {state.site}: already answered an unmasking request")
    if state.signed_survivors is None or survivors != set(state.signed_survivors):
        raise SecAggRefusedError(
            f"site {state.site}: the unmasking request names survivors {sorted(survivors)}, "
            f"not the set this site signed ({list(state.signed_survivors or ())})"
        )
    if not signers <= survivors or len(signers) < state.params.threshold:
        raise SecAggRefusedError(
            f"site {state.site}: {len(signers & survivors)} survivors signed the survivor set; "
            f"the threshold is {state.params.threshold}"
        )
    if survivors & dropped:
        raise SecAggRefusedError(
            f"site {state.site}: sites named both survivor and dropout: "
            f"{sorted(survivors & dropped)}"
        )
    if survivors | dropped != set(state.held) or state.site not in survivors:
        raise SecAggRefusedError(
            f"site {state.site}: survivors and dropouts must split the {len(state.held)} sites "
            "that shared keys, this site among the survivors"
        )
    _check_cohort(state, len(survivors), min_cohort=min_cohort, what="the unmasking")
    reply = UnmaskReply(
        self_seed_shares={n: (state.held[n].x, state.held[n].self_seed_share) for n in survivors},
        mask_key_shares={n: (state.held[n].x, state.held[n].mask_key_share) for n in dropped},
    )
    return replace(state, unmasked=True), reply
