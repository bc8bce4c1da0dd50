"""A homomorphic-encryption round on the Grid: named stages over one typed state.

    advertise_keys    every sampled site sends signed fresh X25519 public keys (as in secagg)
    key_ceremony      one site (the dealer; each attempt starts at another site by name)
                      verifies them, creates the CKKS key and seals it for every other site;
                      the server keeps the public part
    encrypted_inputs  each site gets the dealer's signed keys (the public context and every
                      sealed key), the global adapter and the task; it checks its key against
                      that public context, trains and returns its update, the selected tensors
                      encrypted
    add_ciphertexts   the server adds the ciphertexts, a check, and the plain tensors, if any
    agree_contributors  each contributor signs the contributor set, once per session
    decrypt_sum       one signer adds the contributors' signed inputs and decrypts the sum, if
                      at least ``threshold`` contributors signed that set

Below ``threshold`` contributors the attempt halts and the round is retried, as in secagg.
The server never holds the secret key; it sees ciphertexts, the plain (unselected) tensors, and
the decrypted sum.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from fedsilo.client.he import selector
from fedsilo.ledger import JsonValue
from fedsilo.model.adapters import AdapterState
from fedsilo.model.flatten import flat_length, unflatten
from fedsilo.privacy.he import ckks
from fedsilo.privacy.secagg.masking import SessionId
from fedsilo.privacy.secagg.messages import SecAggMessageError
from fedsilo.protocol.he_records import (
    AGREE_MESSAGE,
    AGREED_STAGE,
    DECRYPT_MESSAGE,
    DECRYPTED_STAGE,
    ENCRYPTED_MESSAGE,
    ENCRYPTED_STAGE,
    HE_KEY,
    KEYGEN_MESSAGE,
    KEYS_STAGE,
    AgreeRequest,
    DecryptRequest,
    EncryptRequest,
    contributors_statement,
    keygen_record,
)
from fedsilo.protocol.records import ProtocolError, check_adapter_values
from fedsilo.protocol.secagg_records import ADVERTS_KEY, SignedPayload, adverts_record
from fedsilo.server.admission import (
    SignedUpload,
    UpdateRejectedError,
    check_claims,
    check_dp_event,
    check_policy_declaration,
    unexpected_failure,
)
from fedsilo.server.rounds import (
    FederationPlan,
    RoundReplies,
    dp_requirement,
    open_round,
    reject,
)
from fedsilo.server.secagg_round import (
    AGGREGATE_SITE,
    SecAggRound,
    SecAggState,
    StageHaltedError,
    accept_input,
    advertise_keys,
    check_sum_norm,
    exchange,
    halt_stage,
    require_sites,
    run_stages,
    secagg_params,
    session_content,
    train_contents,
)
from fedsilo.server.strategies import SiteUpdate

_KEYS_UPLOAD_BYTES = 512 * 1024 * 1024  # one public context and a sealed secret per site


@dataclass
class HeState(SecAggState):
    """What the server learns in one attempt of an HE round."""

    dealer: str | None = None
    public_context: bytes = b""
    dealer_keys: tuple[bytes, bytes] | None = None  # the dealer's signed keys payload, signature
    encrypted: dict[str, list[bytes]] = field(default_factory=dict)
    # Each accepted input as its site signed it: the decrypting site adds these itself.
    signed_inputs: dict[str, SignedPayload] = field(default_factory=dict)
    agreement: dict[str, bytes] = field(default_factory=dict)  # site -> signature over the set
    plain: dict[str, np.ndarray] = field(default_factory=dict)
    plain_sum: np.ndarray | None = None
    decrypted: np.ndarray | None = None
    tensors: tuple[str, ...] = ()
    poly_modulus_degree: int = 8192


def _selected_length(ctx: SecAggRound, state: HeState) -> int:
    return flat_length(ctx.global_state, selector(state.tensors))


def _in_turn(
    ctx: SecAggRound,
    state: HeState,
    sites: list[str],
    content: RecordDict,
    *,
    message_type: str,
    stage: str,
    max_bytes: int,
) -> Iterator[tuple[str, SignedUpload]]:
    """Ask ``sites`` one at a time, in order; yield each that answers, with its signed upload.

    For the stages one site does for all (dealing the key, decrypting): the caller stops at the
    first usable answer, and the next site is asked only if it did not get one.
    """
    for site in sites:
        accepted = exchange(
            ctx,
            state,
            {state.node_of[site]: content},
            message_type=message_type,
            stage=stage,
            max_bytes=max_bytes,
        )
        if site in accepted:
            yield site, accepted[site][0]


def key_ceremony(ctx: SecAggRound, state: HeState) -> None:
    """Stage 2: the first advertiser that answers creates the key and seals it for the others."""
    relayed = adverts_record([state.adverts[site] for site in sorted(state.adverts)])
    content = session_content(
        state, {ADVERTS_KEY: relayed, HE_KEY: keygen_record(state.poly_modulus_degree)}
    )
    # Each attempt starts the turn at another site: a dealer whose key the sites refuse (or
    # that spoils the round otherwise) does not deal every retry of the round.
    by_name = sorted(state.adverts)
    first = (state.session.attempt - 1) % len(by_name)
    answers = _in_turn(
        ctx,
        state,
        by_name[first:] + by_name[:first],
        content,
        message_type=KEYGEN_MESSAGE,
        stage=KEYS_STAGE,
        max_bytes=_KEYS_UPLOAD_BYTES,
    )
    for dealer, upload in answers:
        try:
            header, public, *sealed = ckks.unframe(upload.payload, what=KEYS_STAGE)
            recipients = json.loads(header)["recipients"]
            if recipients != sorted(set(state.adverts) - {dealer}) or len(sealed) != len(
                recipients
            ):
                raise ckks.HeError("the sealed keys do not match the cohort")
            ckks.check_public_context(
                public,
                poly_modulus_degree=state.poly_modulus_degree,
                what="the dealer's public context",
            )
        except (ckks.HeError, ValueError, KeyError, TypeError, RecursionError) as error:
            reject(ctx.plan, ctx.replies, ctx.round_number, dealer, f"{KEYS_STAGE}: {error}")
            continue
        except Exception as error:  # unforeseen: still only this dealer's rejection
            reason = unexpected_failure(error, what=f"the {KEYS_STAGE} payload of {dealer}")
            reject(ctx.plan, ctx.replies, ctx.round_number, dealer, reason)
            continue
        state.dealer, state.public_context = dealer, public
        state.dealer_keys = (upload.payload, upload.signature)
        break
    require_sites(ctx, state, "key_ceremony", list(state.adverts) if state.dealer else [])


def encrypted_inputs(ctx: SecAggRound, state: HeState) -> None:
    """Stage 3: every site of the ceremony trains and sends its encrypted update."""
    assert state.dealer is not None and state.dealer_keys is not None
    cohort = sorted(state.adverts)
    contents = train_contents(ctx, state, cohort)
    request = EncryptRequest(state.adverts[state.dealer], *state.dealer_keys, state.tensors)
    for site in cohort:
        contents[state.node_of[site]][HE_KEY] = request.to_record()
    accepted = exchange(
        ctx,
        state,
        contents,
        message_type=ENCRYPTED_MESSAGE,
        stage=ENCRYPTED_STAGE,
        max_bytes=ctx.plan.config.federation.max_update_bytes,
    )
    selected = _selected_length(ctx, state)
    chunks_expected = math.ceil(selected / (state.poly_modulus_degree // 2))
    plain_bytes = 4 * (state.length - selected)
    context = ckks.load_context(state.public_context, what="public context", secret=False)
    reference = ckks.encrypted_zeros(context, selected)
    site_keys = ctx.plan.membership.site_keys()
    for site, (upload, reply) in accepted.items():
        what = f"encrypted update from {site}"
        try:
            plain, *chunks = ckks.unframe(upload.payload, what=what)
            if len(plain) != plain_bytes or len(chunks) != chunks_expected:
                raise UpdateRejectedError(
                    site,
                    f"encrypted update from {site} has {len(chunks)} ciphertexts and "
                    f"{len(plain)} plain bytes; expected {chunks_expected} and {plain_bytes}",
                )
            # Each site's ciphertexts are checked alone, so a bad one rejects its site only.
            ckks.check_vector(context, chunks, reference=reference, what=what)
            try:
                check_adapter_values(np.frombuffer(plain, dtype="<f4"), what=f"{what}, plain part")
            except ProtocolError as error:
                raise UpdateRejectedError(site, str(error)) from None
            dp_event = check_dp_event(reply.content, dp_requirement(ctx.plan.config), site)
            policy = check_policy_declaration(reply.content, site_keys[site], upload.binding)
            claims = check_claims(
                reply.content, site_keys[site], upload.binding, metrics=None, dp_event=dp_event
            )
        except ckks.HeError as error:
            reject(ctx.plan, ctx.replies, ctx.round_number, site, f"{ENCRYPTED_STAGE}: {error}")
            continue
        except UpdateRejectedError as rejection:
            reject(
                ctx.plan,
                ctx.replies,
                ctx.round_number,
                site,
                f"{ENCRYPTED_STAGE}: {rejection.reason}",
            )
            continue
        except Exception as error:  # unforeseen: still only this site's rejection
            reason = unexpected_failure(error, what=f"the {ENCRYPTED_STAGE} payload of {site}")
            reject(ctx.plan, ctx.replies, ctx.round_number, site, reason)
            continue
        accept_input(ctx, upload, dp_event, policy, claims)
        state.encrypted[site] = chunks
        state.signed_inputs[site] = SignedPayload(site, upload.payload, upload.signature)
        state.plain[site] = np.frombuffer(plain, dtype="<f4").astype(np.float64)
    require_sites(ctx, state, "encrypted_inputs", list(state.encrypted))


def add_ciphertexts(ctx: SecAggRound, state: HeState) -> None:
    """Stage 4: the homomorphic sum, with the public context only (a check that the inputs
    add; the decrypting site adds the signed inputs again itself) and the plain parts' sum."""
    context = ckks.load_context(state.public_context, what="public context", secret=False)
    sites = sorted(state.encrypted)
    try:
        ckks.add_all(context, [state.encrypted[s] for s in sites], what="the encrypted updates")
    except ckks.HeError as error:
        raise StageHaltedError(f"adding the ciphertexts failed: {error}") from None
    state.plain_sum = np.sum([state.plain[s] for s in sites], axis=0)
    require_sites(ctx, state, "add_ciphertexts", sites)


def agree_contributors(ctx: SecAggRound, state: HeState) -> None:
    """Stage 5: every contributor signs the contributor set, once per session; at least
    ``threshold`` must, and only a signer decrypts."""
    contributors = sorted(state.encrypted)
    request = AgreeRequest(tuple(contributors)).to_record()
    statement = contributors_statement(state.session, contributors)
    accepted = exchange(
        ctx,
        state,
        {state.node_of[site]: session_content(state, {HE_KEY: request}) for site in contributors},
        message_type=AGREE_MESSAGE,
        stage=AGREED_STAGE,
        max_bytes=len(statement),
    )
    for site, (upload, _reply) in accepted.items():
        if upload.payload != statement:
            reject(ctx.plan, ctx.replies, ctx.round_number, site, "agreed on another set")
            continue
        state.agreement[site] = upload.signature
    require_sites(ctx, state, "agree_contributors", sorted(state.agreement))


def decrypt_sum(ctx: SecAggRound, state: HeState) -> None:
    """Stage 6: the first signer that answers decrypts the sum of the agreed contributors."""
    contributors = sorted(state.encrypted)
    length = _selected_length(ctx, state)
    inputs = tuple(state.signed_inputs[site] for site in contributors)
    agreement = tuple(sorted(state.agreement.items()))
    request = DecryptRequest(inputs, length, agreement).to_record()
    answers = _in_turn(
        ctx,
        state,
        sorted(state.agreement),
        session_content(state, {HE_KEY: request}),
        message_type=DECRYPT_MESSAGE,
        stage=DECRYPTED_STAGE,
        max_bytes=8 * length,
    )
    out_of_range: dict[str, JsonValue] = {}
    for site, upload in answers:
        payload = upload.payload
        if len(payload) != 8 * length:
            reject(ctx.plan, ctx.replies, ctx.round_number, site, "decrypted sum of wrong length")
            continue
        decrypted = np.frombuffer(payload, dtype="<f8").copy()
        # Inputs are encrypted, so nothing bounded them on arrival: the sum of bounded inputs
        # is bounded by their count, and a larger one would overflow the fp32 global adapter.
        # It is not the decryptor's fault by itself: one input out of range, or encrypted
        # under another key, makes every honest decryptor's sum fail too, and HE cannot tell
        # which contributor did it. So no site is blamed; the next signer is asked.
        try:
            check_adapter_values(decrypted, count=len(contributors), what="decrypted sum")
        except ProtocolError as error:
            out_of_range[site] = str(error)
            continue
        check_sum_norm(
            ctx, state, "decrypt_sum", contributors,
            contributors=len(contributors),
            sum_norm=functools.partial(_whole_sum_norm, decrypted, state.plain_sum),
            what="decrypted",
        )  # fmt: skip
        state.decrypted = decrypted
        break
    evidence = {"out_of_range": out_of_range} if out_of_range else None
    if state.decrypted is None and out_of_range:
        halt_stage(
            ctx, state, "decrypt_sum", [],
            f"every decrypted sum ({len(out_of_range)} signers) is out of range: an input is "
            "out of range or encrypted under another key; HE cannot tell which contributor's, "
            "so no site is rejected",
            evidence,
        )  # fmt: skip
    require_sites(
        ctx, state, "decrypt_sum", contributors if state.decrypted is not None else [], evidence
    )


def _whole_sum_norm(decrypted: np.ndarray, plain_sum: np.ndarray | None) -> float:
    """The L2 norm of an HE round's whole sum: its decrypted and plain parts together (under
    distributed DP every site clipped and noised its whole update, both parts)."""
    plain = 0.0 if plain_sum is None else float(np.linalg.norm(plain_sum))
    return math.hypot(float(np.linalg.norm(decrypted)), plain)


HE_STAGES = (
    advertise_keys,
    key_ceremony,
    encrypted_inputs,
    add_ciphertexts,
    agree_contributors,
    decrypt_sum,
)


def collect_he_round(
    grid: Grid,
    plan: FederationPlan,
    global_state: AdapterState,
    *,
    round_number: int,
    attempt: int,
    nodes: list[int],
) -> RoundReplies:
    """Run the HE stages; on success one aggregate update, the mean of the contributors'."""
    tasks = open_round(plan, global_state, round_number=round_number, attempt=attempt, nodes=nodes)
    membership, section = plan.membership, plan.config.secure_aggregation
    replies = RoundReplies()
    try:
        params = secagg_params(plan, len(nodes))
    except SecAggMessageError as error:  # fewer nodes online than the threshold needs
        replies.failures["secure-aggregation"] = str(error)
        return replies
    state = HeState(
        session=SessionId(membership.federation_id, membership.run_id, round_number, attempt),
        params=params,
        length=flat_length(global_state),
        nodes=list(nodes),
        tensors=section.he_tensors,
        poly_modulus_degree=section.he_poly_modulus_degree,
    )
    run_stages(
        SecAggRound(grid, plan, global_state, tasks, round_number, replies), state, HE_STAGES
    )
    if state.decrypted is None or state.plain_sum is None:
        return replies
    select = selector(state.tensors)
    contributors = sorted(state.encrypted)
    count = len(contributors)
    mean = {
        **unflatten(state.decrypted / count, global_state, select),
        **unflatten(state.plain_sum / count, global_state, lambda name: not select(name)),
    }
    replies.updates.add(SiteUpdate(AGGREGATE_SITE, mean, count))
    replies.contributors = contributors
    return replies
