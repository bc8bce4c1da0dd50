"""The site's homomorphic-encryption handlers: key ceremony, encrypted input, decryption.

Key ceremony: every site of the round advertises signed X25519 keys (the secure-aggregation
advertise stage, reused); one site, the dealer, verifies every advertisement against the
pinned identity keys, creates a CKKS context with a fresh secret key and seals it for each other
site under the key only the two of them agree on. The server relays the sealed contexts and gets
the public part only: it can add ciphertexts, never decrypt them. A site verifies the dealer's
advertisement before it uses the key it received.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedsilo.client.local import SingleSite, local_update
from fedsilo.client.policy import TaskRefusedError
from fedsilo.client.secagg import (
    Handler,
    load_session,
    register_handlers,
    reply_signed,
    verified_cohort,
)
from fedsilo.client.site import Site, SiteProvider
from fedsilo.crypto import (
    SealError,
    SignatureError,
    agree,
    agreement_key_from_bytes,
    open_sealed,
    seal,
    verify_update,
)
from fedsilo.model.flatten import flatten, unflatten
from fedsilo.privacy.distributed_dp import clip_l2, noise_share_std, secure_generator
from fedsilo.privacy.he import ckks
from fedsilo.privacy.secagg.masking import SessionId
from fedsilo.privacy.secagg.messages import (
    ADVERTISE_STAGE,
    Advertisement,
    SecAggMessageError,
    canonical_json,
)
from fedsilo.privacy.secagg.site import SecAggRefusedError, SiteSession, check_announced_cohort
from fedsilo.protocol.he_records import (
    AGREE_MESSAGE,
    AGREED_STAGE,
    DECRYPT_MESSAGE,
    DECRYPTED_STAGE,
    ENCRYPTED_MESSAGE,
    ENCRYPTED_STAGE,
    KEYGEN_MESSAGE,
    KEYS_STAGE,
    AgreeRequest,
    DecryptRequest,
    EncryptRequest,
    contributors_statement,
    keygen_from_content,
)
from fedsilo.protocol.records import round_task_from_content
from fedsilo.protocol.secagg_records import SignedPayload

HE_STATE_KEY = "he-session"


def _key_contexts(state: SiteSession, dealer: str, peer: str) -> tuple[bytes, bytes]:
    """The key derivation context and the sealing's associated data for the dealer's copy
    of the key for ``peer``. The associated data names the round's parameters as this site
    was told them: a site told another threshold or cohort size than the dealer (which
    checked them against the cohort it dealt to) cannot open its key."""
    session = state.session
    sealed_for = session.context("he-seal", dealer, peer) + b"\n" + _params_bytes(state)
    return session.context("he-key", dealer, peer), sealed_for


def _params_bytes(state: SiteSession) -> bytes:
    return canonical_json(state.params.to_fields())


@dataclass(frozen=True)
class _HeSession:
    """What a site holds and has done in one HE session (its own state, never sent)."""

    secret: bytes  # the CKKS secret context
    input_sent: bool = False
    agreed: tuple[str, ...] | None = None  # the contributor set it signed, at most one
    decrypted: bool = False  # a sum decrypted: at most once, never forgotten


def _save(context: Context, state: SiteSession, held: _HeSession) -> None:
    context.state.config_records[HE_STATE_KEY] = ConfigRecord(
        {
            "session": state.session.key(),
            "params": _params_bytes(state),
            "secret": held.secret,
            "input_sent": held.input_sent,
            # Never empty once agreed: an agreed set holds this site and at least threshold.
            "agreed": list(held.agreed or ()),
            "decrypted": held.decrypted,
        }
    )


def _held(context: Context, state: SiteSession) -> _HeSession | None:
    """This site's state for the session (None before it has a key for it), if the session
    still has the parameters the key was made or opened under."""
    record = context.state.config_records.get(HE_STATE_KEY)
    if record is None or record.get("session") != state.session.key():
        return None
    if record.get("params") != _params_bytes(state):
        raise SecAggRefusedError(
            f"site {state.site}: the round's parameters changed within session "
            f"{state.session.key()}"
        )
    agreed = record["agreed"]
    assert isinstance(agreed, list)
    return _HeSession(
        secret=bytes(record["secret"]),  # type: ignore[arg-type]
        input_sent=bool(record["input_sent"]),
        agreed=tuple(str(name) for name in agreed) or None,
        decrypted=bool(record["decrypted"]),
    )


def _load(context: Context, state: SiteSession) -> _HeSession:
    held = _held(context, state)
    if held is None:
        raise SecAggRefusedError(
            f"site {state.site}: holds no CKKS key for session {state.session.key()}"
        )
    return held


def handle_keygen(message: Message, context: Context, sites: SiteProvider) -> Message:
    """The dealer: verify the cohort, create the CKKS key, seal it for every other site."""
    site = sites.site_for(context)
    state = load_session(context, site, message)
    cohort = verified_cohort(site, message, state.session)
    if cohort.get(site.name) != state.advertisement():
        raise SecAggRefusedError(f"site {site.name}: the cohort does not hold this site's keys")
    check_announced_cohort(state, len(cohort))
    if _held(context, state) is not None:
        # A second key would reset what this site has sent and decrypted in the session.
        raise SecAggRefusedError(f"site {site.name}: already holds a CKKS key for this session")
    secret = ckks.new_secret_context(keygen_from_content(message.content))
    share_key = agreement_key_from_bytes(state.share_key)
    recipients = sorted(name for name in cohort if name != site.name)
    sealed = []
    for peer in recipients:
        key_context, associated = _key_contexts(state, site.name, peer)
        key = agree(share_key, cohort[peer].share_public, context=key_context)
        sealed.append(seal(key, secret, associated=associated))
    _save(context, state, _HeSession(secret))
    header = canonical_json({"recipients": recipients})
    payload = ckks.frame([header, ckks.public_part(secret), *sealed])
    return reply_signed(message, site, state.session, KEYS_STAGE, payload)


def _received_secret(site: Site, state: SiteSession, request: EncryptRequest) -> bytes:
    dealer = request.dealer
    if dealer.site not in site.peer_keys:
        raise SecAggRefusedError(f"site {site.name}: dealer {dealer.site!r} is not enrolled")
    try:
        verify_update(
            site.peer_keys[dealer.site],
            dealer.binding(state.session, ADVERTISE_STAGE),
            dealer.signature,
        )
        advert = Advertisement.from_payload(
            dealer.payload, site=dealer.site, session=state.session.key()
        )
    except (SignatureError, SecAggMessageError) as error:
        raise SecAggRefusedError(
            f"site {site.name}: the dealer's advertisement is not authentic: {error}"
        ) from None
    public, sealed = _sealed_for(site, state, request)
    key_context, associated = _key_contexts(state, dealer.site, site.name)
    key = agree(agreement_key_from_bytes(state.share_key), advert.share_public, context=key_context)
    try:
        secret = open_sealed(key, sealed, associated=associated)
    except SealError as error:
        raise SecAggRefusedError(f"site {site.name}: the sealed CKKS key: {error}") from None
    # A dealer that sealed different keys to different sites (or one other than the public
    # context the server adds under) would make every decrypted sum garbage: refuse it here,
    # naming the dealer, before training.
    try:
        matches = ckks.public_part(secret) == public
    except ckks.HeError as error:
        raise SecAggRefusedError(f"site {site.name}: the sealed CKKS key: {error}") from None
    if not matches:
        raise SecAggRefusedError(
            f"site {site.name}: the CKKS key dealer {dealer.site} sealed for it is not the key "
            "of the public context the dealer signed for the round"
        )
    return secret


def _sealed_for(site: Site, state: SiteSession, request: EncryptRequest) -> tuple[bytes, bytes]:
    """The public context and this site's sealed secret from the dealer's signed keys."""
    signed = request.signed_keys
    try:
        verify_update(
            site.peer_keys[signed.site], signed.binding(state.session, KEYS_STAGE), signed.signature
        )
        header, public, *sealed = ckks.unframe(signed.payload, what="the dealer's keys")
        recipients = json.loads(header)["recipients"]
        index = recipients.index(site.name)
        return public, sealed[index]
    except SignatureError as error:
        raise SecAggRefusedError(
            f"site {site.name}: the dealer's keys are not authentic: {error}"
        ) from None
    except (ckks.HeError, ValueError, KeyError, TypeError, IndexError) as error:
        raise SecAggRefusedError(
            f"site {site.name}: the dealer's keys hold no sealed key for it ({error})"
        ) from None


def selector(tensors: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a tensor is encrypted: its name contains one of ``tensors`` (all when empty)."""
    return lambda name: not tensors or any(part in name for part in tensors)


def handle_encrypted_input(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Train, then send the selected tensors encrypted under the ceremony's key."""
    site = sites.site_for(context)
    state = load_session(context, site, message)
    task = round_task_from_content(message.content, what="the encrypted-input request")
    if (task.federation_id, task.run_id, task.round) != (
        state.session.federation_id,
        state.session.run_id,
        state.session.round,
    ):
        raise SecAggRefusedError(f"site {site.name}: the round task is for another session")
    held = _held(context, state)
    if held is not None and held.input_sent:
        # One input per session, and the decrypted flag is never reset: a second input would
        # let the server ask this site to decrypt a second "sum", one site's ciphertext say.
        raise SecAggRefusedError(f"site {site.name}: already sent its encrypted input")
    request = EncryptRequest.from_content(message.content)
    if request.dealer.site == site.name:
        secret = _load(context, state).secret
    elif held is not None:
        # This site dealt the session's key: it encrypts under no other dealer's.
        raise SecAggRefusedError(
            f"site {site.name}: dealt this session's key; {request.dealer.site} cannot deal too"
        )
    else:
        secret = _received_secret(site, state, request)
    # Loaded before training: a key that does not load must cost no DP spending.
    key = ckks.load_context(secret, what="CKKS key", secret=True)
    select = selector(request.tensors)
    update = local_update(
        message, context, SingleSite(site), channel="he", in_clear=lambda name: not select(name)
    )
    params = state.params
    if params.distributed_dp:
        std = noise_share_std(
            noise_multiplier=params.dp_noise_multiplier,
            clip_norm=params.dp_clip_norm,
            threshold=params.threshold,
        )
        full = clip_l2(flatten(update.delta), clip_norm=params.dp_clip_norm)
        noise = secure_generator().normal(0.0, std, size=len(full))
        noised = unflatten(full + noise, update.delta)
    else:
        noised = update.delta
    encrypted = flatten(noised, select)
    plain = flatten(noised, lambda name: not select(name)).astype("<f4")
    chunks = ckks.encrypt(key, encrypted)
    payload = ckks.frame([plain.tobytes(), *chunks])
    # The dealer may have been asked to decrypt before its input: that is never forgotten.
    _save(context, state, dataclasses.replace(held or _HeSession(secret), input_sent=True))
    return reply_signed(message, site, state.session, ENCRYPTED_STAGE, payload, update)


def handle_agree(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Sign the round's contributor set, once per session: the one set this site lets be
    decrypted. Only a site that sent its input signs, and only a set that holds it."""
    site = sites.site_for(context)
    state = load_session(context, site, message)
    held = _load(context, state)
    if not held.input_sent:
        raise SecAggRefusedError(f"site {site.name}: sent no encrypted input in this session")
    if held.agreed is not None:
        raise SecAggRefusedError(f"site {site.name}: already agreed on a contributor set")
    contributors = _contributors(
        site, state, AgreeRequest.from_content(message.content).contributors
    )
    if site.name not in contributors:
        raise SecAggRefusedError(f"site {site.name}: the contributor set must hold this site")
    _save(context, state, dataclasses.replace(held, agreed=contributors))
    statement = contributors_statement(state.session, contributors)
    return reply_signed(message, site, state.session, AGREED_STAGE, statement)


def _contributors(site: Site, state: SiteSession, names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` sorted, if they are distinct enrolled sites, enough for this site's rules."""
    unknown = sorted(set(names) - set(site.peer_keys))
    if unknown or len(set(names)) != len(names):
        raise SecAggRefusedError(
            f"site {site.name}: contributors {unknown} are not enrolled, or named twice"
        )
    min_cohort = site.policy.limits.min_cohort if site.policy is not None else 1
    needed = max(state.params.threshold, min_cohort)
    if len(names) < needed:
        raise TaskRefusedError(
            f"site {site.name}: the sum holds {len(names)} sites; this site decrypts "
            f"only sums of at least {needed} (threshold {state.params.threshold}, policy "
            f"min_cohort {min_cohort})"
        )
    return tuple(sorted(names))


def handle_decrypt(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Decrypt the sum of the contributor set this site agreed on, once per session, if at
    least ``threshold`` contributors signed that same set (a majority of the key holders, so
    no second set can gather as many), adding the contributors' signed inputs itself."""
    site = sites.site_for(context)
    state = load_session(context, site, message)
    held = _load(context, state)
    if held.decrypted:
        raise SecAggRefusedError(f"site {site.name}: already decrypted a sum in this session")
    request = DecryptRequest.from_content(message.content)
    contributors = _contributors(site, state, request.contributors)
    if held.agreed != contributors:
        raise SecAggRefusedError(
            f"site {site.name}: the sum is not over the contributor set this site agreed on"
        )
    _check_agreement(site, state, contributors, request.agreement)
    key = ckks.load_context(held.secret, what="CKKS key", secret=True)
    chunks = math.ceil(request.length / ckks.slots(key))
    summed = ckks.add_all(
        key,
        [_verified_input(site, state.session, signed, chunks) for signed in request.inputs],
        what="the contributors' inputs",
    )
    values = ckks.decrypt(key, summed, length=request.length, what="the summed input")
    _save(context, state, dataclasses.replace(held, decrypted=True))
    payload = np.asarray(values, dtype="<f8").tobytes()
    return reply_signed(message, site, state.session, DECRYPTED_STAGE, payload)


def _check_agreement(
    site: Site,
    state: SiteSession,
    contributors: tuple[str, ...],
    agreement: tuple[tuple[str, bytes], ...],
) -> None:
    """At least ``threshold`` distinct contributors signed ``contributors`` in this session."""
    statement = contributors_statement(state.session, contributors)
    signers = set()
    for signer, signature in agreement:
        if signer not in contributors or signer in signers:
            raise SecAggRefusedError(
                f"site {site.name}: {signer!r} is not a contributor, or signed twice"
            )
        try:
            verify_update(
                site.peer_keys[signer],
                SignedPayload(signer, statement, signature).binding(state.session, AGREED_STAGE),
                signature,
            )
        except SignatureError:
            raise SecAggRefusedError(
                f"site {site.name}: {signer}'s signature is not over this contributor set"
            ) from None
        signers.add(signer)
    if len(signers) < state.params.threshold:
        raise SecAggRefusedError(
            f"site {site.name}: {len(signers)} contributors agreed on the set; the threshold "
            f"is {state.params.threshold}"
        )


def _verified_input(
    site: Site, session: SessionId, signed: SignedPayload, chunks: int
) -> list[bytes]:
    """The ciphertexts of a contributor's encrypted input, if it signed them for this
    session's encrypted-input stage (so no input can be passed off as another's or as a sum)."""
    try:
        verify_update(
            site.peer_keys[signed.site], signed.binding(session, ENCRYPTED_STAGE), signed.signature
        )
    except SignatureError:
        raise SecAggRefusedError(
            f"site {site.name}: the input relayed as {signed.site}'s is not signed by it for "
            "this session"
        ) from None
    _plain, *ciphertexts = ckks.unframe(signed.payload, what=f"{signed.site}'s input")
    if len(ciphertexts) != chunks:
        raise SecAggRefusedError(
            f"site {site.name}: {signed.site}'s input holds {len(ciphertexts)} ciphertexts, "
            f"expected {chunks}"
        )
    return ciphertexts


def register(app: ClientApp, sites: SiteProvider) -> None:
    """Add the key-ceremony, encrypted-input and decryption handlers to ``app``."""
    handlers: dict[str, Handler] = {
        KEYGEN_MESSAGE: handle_keygen,
        ENCRYPTED_MESSAGE: handle_encrypted_input,
        AGREE_MESSAGE: handle_agree,
        DECRYPT_MESSAGE: handle_decrypt,
    }
    register_handlers(app, sites, handlers)
