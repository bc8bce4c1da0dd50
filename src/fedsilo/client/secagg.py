"""The site's secure-aggregation handlers: one per stage, state kept in the node's Context.

The session's secrets (X25519 private keys, self-mask seed, shares held for peers) live in
``context.state`` on the site and never leave it except as the shares the protocol sends,
sealed for their recipient (a deployed site's worker lends them to the context for one task
at a time and keeps them from its SuperNode: :mod:`fedsilo.deploy.session_secrets`). Every
advertisement the server relays is verified against the peer's pinned Ed25519 key before it
is used, so the server cannot substitute keys; likewise every survivor's signature on the
survivor set before the site unmasks, so the server cannot tell different sites different
survivors.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedsilo.client.local import (
    LocalUpdate,
    SingleSite,
    local_update,
    sign_payload,
    sign_policy,
    sign_site_claims,
)
from fedsilo.client.opened_sessions import (
    last_attempts,
    opened_before,
    read_opened,
    record_opened,
)
from fedsilo.client.policy import TaskRefusedError, check_distributed_dp, check_task
from fedsilo.client.site import Site, SiteProvider
from fedsilo.crypto import SignatureError, verify_update
from fedsilo.model.flatten import flatten
from fedsilo.privacy.distributed_dp import (
    clip_l2,
    noise_share_std,
    rounded_gaussian,
    secure_generator,
)
from fedsilo.privacy.secagg import site as protocol
from fedsilo.privacy.secagg.consistency import CONSISTENCY_STAGE, survivor_binding
from fedsilo.privacy.secagg.masking import SessionId
from fedsilo.privacy.secagg.messages import (
    ADVERTISE_STAGE,
    MASKED_STAGE,
    SHARE_STAGE,
    UNMASK_STAGE,
    Advertisement,
    SecAggMessageError,
    SecAggParams,
    encode_sealed_map,
)
from fedsilo.privacy.secagg.quantize import RING_DTYPE, quantize
from fedsilo.protocol.records import (
    CLAIMS_KEY,
    DP_EVENT_KEY,
    POLICY_KEY,
    TASK_KEY,
    RoundTask,
    global_record_from_content,
    round_task_from_content,
)
from fedsilo.protocol.secagg_records import (
    ADVERTISE_MESSAGE,
    CONSISTENCY_MESSAGE,
    MASKED_MESSAGE,
    SHARE_MESSAGE,
    UNMASK_MESSAGE,
    adverts_from_content,
    session_from_content,
    shares_from_content,
    signed_reply,
    survivor_signatures_from_content,
    survivors_from_content,
    unmask_from_content,
)

STATE_KEY = "secagg-session"
# Every session key this site has opened in the Flower run (its node's Context); a site with
# a sessions file also keeps them across runs.
OPENED_KEY = "secagg-opened"


def _min_cohort(site: Site) -> int:
    return site.policy.limits.min_cohort if site.policy is not None else 1


def reply_signed(
    message: Message,
    site: Site,
    session: SessionId,
    stage: str,
    payload: bytes,
    update: LocalUpdate | None = None,
) -> Message:
    """The signed reply with ``payload``; an input stage (``update`` given) also declares the
    policy the site trained under and signs its claims: its DP event (no metrics are sent)."""
    binding, signature = sign_payload(
        site,
        federation_id=session.federation_id,
        run_id=session.run_id,
        round_number=session.round,
        stage=stage,
        payload=payload,
    )
    content = signed_reply(payload, binding, signature)
    if update is not None:
        content[POLICY_KEY] = sign_policy(site, binding, update.policy).to_record()
        claims = sign_site_claims(site, binding, metrics=None, dp_event=update.dp_event)
        content[CLAIMS_KEY] = claims.to_record()
        if update.dp_event is not None:
            content[DP_EVENT_KEY] = ConfigRecord(dict(update.dp_event))
    return Message(content, reply_to=message)


def _save(context: Context, state: protocol.SiteSession) -> None:
    context.state.config_records[STATE_KEY] = ConfigRecord({"state": state.to_bytes()})


def load_session(context: Context, site: Site, message: Message) -> protocol.SiteSession:
    session, params = session_from_content(message.content)
    record = context.state.config_records.get(STATE_KEY)
    raw = record.get("state") if record is not None else None
    if not isinstance(raw, bytes):
        raise protocol.SecAggRefusedError(f"site {site.name}: no secure-aggregation session open")
    state = protocol.SiteSession.from_bytes(raw)
    if state.session != session or state.params != params or state.site != site.name:
        raise protocol.SecAggRefusedError(
            f"site {site.name}: the request is for session {session.key()}, but the open session "
            f"is {state.session.key()} (or its parameters changed)"
        )
    return state


def _opened_sessions(context: Context, site: Site) -> list[str]:
    """Every session key the site has opened: in this Flower run (its node's Context) and,
    where the site keeps one, in any run before (its own file, see client.opened_sessions)."""
    record = context.state.config_records.get(OPENED_KEY)
    opened = record.get("sessions") if record is not None else None
    in_run = [str(key) for key in opened] if isinstance(opened, list) else []
    on_disk = [] if site.sessions_path is None else read_opened(site.sessions_path, site=site.name)
    try:
        return last_attempts([*on_disk, *in_run])
    except ValueError as error:
        raise protocol.SecAggRefusedError(
            f"site {site.name}: its record of opened sessions in this run is unreadable ({error})"
        ) from None


def handle_advertise(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Stage 1: open a session with fresh keys; reply with the signed public keys.

    A session is opened once: advertising again for a session key this site has opened
    would reset what it did in it (masked, signed a survivor set, unmasked), letting the
    server replay the other survivors' signatures of that session into a second unmasking.
    A retried attempt is a new session (its attempt number is in the key); attempts go
    upwards, so a site opens only an attempt later than the last it opened of that round
    (see client.opened_sessions)."""
    site = sites.site_for(context)
    session, params = session_from_content(message.content)
    if site.policy is not None and site.policy.accept.federation_id != session.federation_id:
        raise TaskRefusedError(
            f"site {site.name}: policy accepts federation {site.policy.accept.federation_id!r}, "
            f"not {session.federation_id!r}"
        )
    opened = _opened_sessions(context, site)
    ruled_out_by = opened_before(opened, session)
    if ruled_out_by is not None:
        raise protocol.SecAggRefusedError(
            f"site {site.name}: already opened session {ruled_out_by}; a session is opened "
            f"once and a retry opens a later attempt, so {session.key()} is refused"
        )
    if params.cohort_size < _min_cohort(site):
        raise TaskRefusedError(
            f"site {site.name}: the round sums {params.cohort_size} sites; policy requires at "
            f"least {_min_cohort(site)}"
        )
    # Before any key is made; HE rounds open their session here too, and every later stage of
    # either mode is held to these parameters (load_session).
    check_distributed_dp(site.policy, params.dp_noise_multiplier, site=site.name)
    if site.policy is not None and TASK_KEY in message.content.config_records:
        # The round's task is checked before the site joins: a refusal costs no keys.
        task = RoundTask.from_record(message.content.config_records[TASK_KEY])
        check_task(site.policy, task, site=site.name, num_examples=len(site.examples))
    state = protocol.advertise(site=site.name, session=session, params=params)
    opened = last_attempts([*opened, session.key()])
    if site.sessions_path is not None:  # on disk before the site answers
        record_opened(site.sessions_path, opened)
    context.state.config_records[OPENED_KEY] = ConfigRecord({"sessions": opened})
    _save(context, state)
    return reply_signed(message, site, session, ADVERTISE_STAGE, state.advertisement().to_payload())


def verified_cohort(site: Site, message: Message, session: SessionId) -> dict[str, Advertisement]:
    cohort: dict[str, Advertisement] = {}
    for signed in adverts_from_content(message.content):
        if signed.site in cohort:
            raise protocol.SecAggRefusedError(f"site {site.name}: {signed.site} advertised twice")
        if signed.site not in site.peer_keys:
            raise protocol.SecAggRefusedError(
                f"site {site.name}: {signed.site!r} is not an enrolled site of this federation"
            )
        try:
            verify_update(
                site.peer_keys[signed.site],
                signed.binding(session, ADVERTISE_STAGE),
                signed.signature,
            )
            advert = Advertisement.from_payload(
                signed.payload, site=signed.site, session=session.key()
            )
        except (SignatureError, SecAggMessageError) as error:
            raise protocol.SecAggRefusedError(
                f"site {site.name}: the key advertisement of {signed.site} is not "
                f"authentic: {error}"
            ) from None
        cohort[signed.site] = advert
    return cohort


def handle_share(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Stage 2: verify the cohort's advertisements; reply with shares sealed for each peer."""
    site = sites.site_for(context)
    state = load_session(context, site, message)
    cohort = verified_cohort(site, message, state.session)
    state, sealed = protocol.share_keys(state, cohort)
    _save(context, state)
    return reply_signed(message, site, state.session, SHARE_STAGE, encode_sealed_map(sealed))


def _quantized_update(
    site: Site, params: SecAggParams, message: Message, context: Context
) -> tuple[np.ndarray, LocalUpdate]:
    update = local_update(message, context, SingleSite(site), channel="secagg")
    vector = flatten(update.delta)
    q = params.quantization()
    if params.distributed_dp:
        vector = clip_l2(vector, clip_norm=params.dp_clip_norm)
    words = quantize(vector, q)
    if params.distributed_dp:
        std = noise_share_std(
            noise_multiplier=params.dp_noise_multiplier,
            clip_norm=params.dp_clip_norm,
            threshold=params.threshold,
        )
        noise = rounded_gaussian(len(words), std=std * q.scale, generator=secure_generator())
        words = words + noise.astype(RING_DTYPE)  # wraps modulo 2^32
    return words, update


def handle_masked_input(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Stage 3: open the relayed shares, check the cohort, train, reply with the masked input."""
    site = sites.site_for(context)
    state = load_session(context, site, message)
    what = "the masked-input request"
    task = round_task_from_content(message.content, what=what)
    global_record_from_content(message.content, what=what)  # before the session moves on
    bound = (task.federation_id, task.run_id, task.round)
    if bound != (state.session.federation_id, state.session.run_id, state.session.round):
        raise protocol.SecAggRefusedError(
            f"site {site.name}: the round task is for {bound}, not session {state.session.key()}"
        )
    # The cohort check comes before any training: a refused round costs nothing.
    state = protocol.receive_shares(
        state, shares_from_content(message.content), min_cohort=_min_cohort(site)
    )
    _save(context, state)
    words, update = _quantized_update(site, state.params, message, context)
    masked = protocol.mask(state, words)
    payload = masked.astype("<u4").tobytes()
    return reply_signed(message, site, state.session, MASKED_STAGE, payload, update)


def handle_consistency(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Stage 4: sign, once, the survivor set the server names (Bonawitz's consistency check)."""
    site = sites.site_for(context)
    state = load_session(context, site, message)
    survivors = survivors_from_content(message.content)
    state, statement = protocol.agree_survivors(state, survivors, min_cohort=_min_cohort(site))
    _save(context, state)
    return reply_signed(message, site, state.session, CONSISTENCY_STAGE, statement)


def verified_signers(site: Site, message: Message, state: protocol.SiteSession) -> set[str]:
    """The sites whose forwarded signatures on the set this site signed verify; any other
    signature (another set, an unknown or unenrolled signer) refuses the whole request."""
    survivors = state.signed_survivors
    if survivors is None:
        raise protocol.SecAggRefusedError(f"site {site.name}: has not signed a survivor set")
    signers: set[str] = set()
    for signer, signature in survivor_signatures_from_content(message.content).items():
        if signer not in site.peer_keys or signer not in survivors:
            raise protocol.SecAggRefusedError(
                f"site {site.name}: a survivor-set signature from {signer!r}, which is not an "
                "enrolled survivor"
            )
        binding = survivor_binding(state.session, signer, survivors)
        try:
            verify_update(site.peer_keys[signer], binding, signature)
        except SignatureError:
            raise protocol.SecAggRefusedError(
                f"site {site.name}: the signature of {signer} is not over the survivor set this "
                f"site signed ({', '.join(survivors)}): the server showed sites different sets"
            ) from None
        signers.add(signer)
    return signers


def handle_unmask(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Stage 5: reply, once, with the shares that unmask exactly the named survivors' sum,
    if at least ``threshold`` survivors signed the same survivor set as this site."""
    site = sites.site_for(context)
    state = load_session(context, site, message)
    survivors, dropped = unmask_from_content(message.content)
    signers = verified_signers(site, message, state)
    state, reply = protocol.unmask(
        state,
        survivors=survivors,
        dropped=dropped,
        signers=signers,
        min_cohort=_min_cohort(site),
    )
    _save(context, state)
    return reply_signed(message, site, state.session, UNMASK_STAGE, reply.to_payload())


def register(app: ClientApp, sites: SiteProvider) -> None:
    """Add the five secure-aggregation handlers to ``app``."""
    handlers: dict[str, Handler] = {
        ADVERTISE_MESSAGE: handle_advertise,
        SHARE_MESSAGE: handle_share,
        MASKED_MESSAGE: handle_masked_input,
        CONSISTENCY_MESSAGE: handle_consistency,
        UNMASK_MESSAGE: handle_unmask,
    }
    register_handlers(app, sites, handlers)


def register_handlers(app: ClientApp, sites: SiteProvider, handlers: dict[str, Handler]) -> None:
    """Serve each ``"train.X"`` or ``"query.X"`` message type with its handler."""
    for message_type, handler in handlers.items():
        category, action = message_type.split(".")
        decorator = app.train(action) if category == "train" else app.query(action)
        decorator(bind(handler, sites))


Handler = Callable[[Message, Context, SiteProvider], Message]


def bind(handler: Handler, sites: SiteProvider) -> Callable[[Message, Context], Message]:
    """``handler`` as a Flower handler serving ``sites``."""

    def serve(message: Message, context: Context) -> Message:
        return handler(message, context, sites)

    return serve
