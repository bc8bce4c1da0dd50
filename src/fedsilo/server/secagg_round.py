"""A secure-aggregation round on the Grid: five named stages over one typed state.

    advertise_keys        every sampled site sends signed fresh X25519 public keys   (U1)
    share_keys            the server relays U1's adverts; each site returns shares of its
                          self-mask seed and mask key, sealed for each peer          (U2)
    collect_masked_inputs each site in U2 gets its sealed shares, the global adapter and the
                          task; it trains and returns its masked, quantized update   (U3)
    check_consistency     each site of U3 signs the set U3 once (Bonawitz's check)     (U4)
    unmask                U4 get the signatures; each that verifies threshold of them on
                          the set it signed sends self-seed shares of U3 and mask-key
                          shares of U2 minus U3; the server rebuilds them (shares off
                          their polynomial are left out and ledgered), removes the masks

Any stage that leaves fewer than ``threshold`` sites halts the attempt (:class:`StageHaltedError`):
the round is retried from the same global adapter with fresh keys, as a plain round is. The
server holds only masked vectors, ciphertexts and the shares it is owed; the only plaintext it
ever computes is the sum of at least ``threshold`` sites' inputs. Each stage's outcome is
ledgered, and each masked input as an ``update_received`` entry with the site's signature.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedsilo.crypto import encode_signature
from fedsilo.ledger import EntryKind, JsonValue
from fedsilo.model.adapters import AdapterState
from fedsilo.model.flatten import flat_length, unflatten
from fedsilo.privacy.secagg.consistency import CONSISTENCY_STAGE, survivor_statement
from fedsilo.privacy.secagg.masking import SessionId
from fedsilo.privacy.secagg.messages import (
    ADVERTISE_STAGE,
    MASKED_STAGE,
    SHARE_STAGE,
    UNMASK_STAGE,
    Advertisement,
    SecAggMessageError,
    SecAggParams,
    UnmaskReply,
    decode_sealed_map,
)
from fedsilo.privacy.secagg.quantize import RING_DTYPE, dequantize
from fedsilo.privacy.secagg.recovery import RecoveryError, recover_sum
from fedsilo.protocol.records import (
    LORA_KEY,
    TASK_KEY,
    LoraSpec,
    RoundTask,
    SignedClaims,
    SignedPolicy,
    adapter_to_record,
    train_instruction,
)
from fedsilo.protocol.secagg_records import (
    ADVERTISE_MESSAGE,
    ADVERTS_KEY,
    CONSISTENCY_MESSAGE,
    MASKED_MESSAGE,
    SECAGG_KEY,
    SHARE_MESSAGE,
    SHARES_KEY,
    SURVIVOR_SIGNATURES_KEY,
    SURVIVORS_KEY,
    UNMASK_KEY,
    UNMASK_MESSAGE,
    SignedPayload,
    adverts_record,
    session_record,
    shares_record,
    survivor_signatures_record,
    survivors_record,
    unmask_record,
)
from fedsilo.server.admission import (
    ExpectedBinding,
    SignedUpload,
    UpdateRejectedError,
    admit_signed,
    check_claims,
    check_dp_event,
    check_policy_declaration,
    unexpected_failure,
)
from fedsilo.server.rounds import (
    FederationPlan,
    RoundReplies,
    accept,
    answers_for,
    dp_requirement,
    dp_task,
    open_round,
    reject,
    rejected_sender,
    send_and_attribute,
)
from fedsilo.server.strategies import SiteUpdate

log = logging.getLogger(__name__)

AGGREGATE_SITE = "secure-aggregate"
_SMALL_UPLOAD_BYTES = 4 * 1024 * 1024  # keys, sealed shares, unmasking shares


class StageHaltedError(Exception):
    """Too few sites are left at a stage: this attempt stops cleanly (the round is retried)."""


@dataclass
class SecAggState:
    """Everything the server learns in one attempt of a secure round, stage by stage."""

    session: SessionId
    params: SecAggParams
    length: int  # values in the flattened adapter
    nodes: list[int]
    node_of: dict[str, int] = field(default_factory=dict)
    adverts: dict[str, SignedPayload] = field(default_factory=dict)  # U1, relayed verbatim
    keys: dict[str, Advertisement] = field(default_factory=dict)
    sealed: dict[str, dict[str, bytes]] = field(default_factory=dict)  # U2: sender -> recipient
    masked: dict[str, np.ndarray] = field(default_factory=dict)  # U3
    survivor_signatures: dict[str, bytes] = field(default_factory=dict)  # U4: signed U3
    unmasking: dict[str, UnmaskReply] = field(default_factory=dict)
    total: np.ndarray | None = None  # the unmasked ring sum of U3's inputs
    stages: list[dict[str, JsonValue]] = field(default_factory=list)


@dataclass(frozen=True)
class SecAggRound:
    """What the stages need besides the state: where to send, and what the round is."""

    grid: Grid
    plan: FederationPlan
    global_state: AdapterState
    tasks: Mapping[int, RoundTask]
    round_number: int
    replies: RoundReplies  # failures, ledgered uploads and bytes, as for a plain round


def exchange(
    ctx: SecAggRound,
    state: SecAggState,
    contents: Mapping[int, RecordDict],
    *,
    message_type: str,
    stage: str,
    max_bytes: int,
) -> dict[str, tuple[SignedUpload, Message]]:
    """Send one request per node; admit each signed reply of ``stage``; note every failure."""
    config = ctx.plan.config
    messages = [
        Message(
            content, dst_node_id=node, message_type=message_type, group_id=str(ctx.round_number)
        )
        for node, content in contents.items()
    ]
    replies = send_and_attribute(ctx.grid, messages, timeout=config.strategy.round_timeout_s)
    expected = ExpectedBinding(
        federation_id=state.session.federation_id,
        run_id=state.session.run_id,
        round=state.session.round,
        stage=stage,
    )
    site_keys = ctx.plan.membership.site_keys()
    accepted: dict[str, tuple[SignedUpload, Message]] = {}
    answered: set[int] = set()
    for node, reply in replies:
        answered.add(node)
        try:
            upload = admit_signed(
                reply,
                expected=expected,
                site_keys=site_keys,
                admitted_sites=accepted.keys(),
                max_bytes=max_bytes,
            )
            site = upload.binding.site_id
            # Before the reply counts as the site's: a node relaying another site's signed
            # message would otherwise take that site's place in the attempt.
            if not answers_for(ctx.plan, node, site):
                raise UpdateRejectedError(site, f"a message {site} signed, sent by another node")
            if state.node_of.setdefault(site, node) != node:
                raise UpdateRejectedError(site, f"{site} answered from node {node}, not its own")
        except UpdateRejectedError as rejection:
            sender = rejected_sender(ctx.plan, node, reply, rejection.sender)
            reject(ctx.plan, ctx.replies, ctx.round_number, sender, f"{stage}: {rejection.reason}")
            continue
        except Exception as error:  # never one site's reply ends the round
            label = ctx.plan.node_label(node)
            reason = unexpected_failure(error, what=f"the {stage} reply of {label}")
            reject(ctx.plan, ctx.replies, ctx.round_number, label, reason)
            continue
        ctx.plan.node_sites[node] = site
        accepted[site] = (upload, reply)
        ctx.replies.bytes_up[site] = ctx.replies.bytes_up.get(site, 0) + len(upload.payload)
    for node in contents:
        if node not in answered:
            reason = f"{stage}: no reply within {config.strategy.round_timeout_s:g} s"
            reject(ctx.plan, ctx.replies, ctx.round_number, ctx.plan.node_label(node), reason)
    return accepted


def require_sites(
    ctx: SecAggRound,
    state: SecAggState,
    stage: str,
    sites: list[str],
    evidence: Mapping[str, JsonValue] | None = None,
) -> None:
    """Ledger the stage's outcome (with ``evidence`` fields); halt the attempt if fewer than
    ``threshold`` sites remain."""
    threshold = state.params.threshold
    if len(sites) < threshold:
        reason = (
            f"secure aggregation stopped at {stage}: {len(sites)} sites left, the threshold "
            f"is {threshold}"
        )
        halt_stage(ctx, state, stage, sites, reason, evidence)
    _ledger_stage(ctx, state, stage, sites, {**(evidence or {}), "outcome": "completed"})


def halt_stage(
    ctx: SecAggRound,
    state: SecAggState,
    stage: str,
    sites: list[str],
    reason: str,
    evidence: Mapping[str, JsonValue] | None = None,
) -> NoReturn:
    """Ledger that ``stage`` halted the attempt, and why; end the attempt."""
    _ledger_stage(
        ctx, state, stage, sites, {**(evidence or {}), "outcome": "halted", "reason": reason}
    )
    raise StageHaltedError(reason)


def _ledger_stage(
    ctx: SecAggRound,
    state: SecAggState,
    stage: str,
    sites: list[str],
    fields: Mapping[str, JsonValue],
) -> None:
    outcome: dict[str, JsonValue] = {
        "round": state.session.round,
        "attempt": state.session.attempt,
        "stage": stage,
        "sites": list(sorted(sites)),
        "threshold": state.params.threshold,
        **fields,
    }
    ctx.plan.ledger.append(EntryKind.SECURE_AGGREGATION_STAGE, outcome)
    state.stages.append(outcome)


def session_content(
    state: SecAggState, records: Mapping[str, ArrayRecord | ConfigRecord] | None = None
) -> RecordDict:
    """A request of this session: the session record, plus ``records`` by key."""
    return RecordDict({SECAGG_KEY: session_record(state.session, state.params), **(records or {})})


def advertise_keys(ctx: SecAggRound, state: SecAggState) -> None:
    """Stage 1: collect each site's signed key advertisement (U1)."""
    lora = LoraSpec.of(ctx.plan.config.lora).to_record()
    # The round task and adapter shape travel from the first stage on: a site checks the task
    # against its policy before it joins, and a deployed site loads its model.
    contents = {
        node: session_content(state, {TASK_KEY: ctx.tasks[node].to_record(), LORA_KEY: lora})
        for node in state.nodes
    }
    accepted = exchange(
        ctx,
        state,
        contents,
        message_type=ADVERTISE_MESSAGE,
        stage=ADVERTISE_STAGE,
        max_bytes=_SMALL_UPLOAD_BYTES,
    )
    for site, (upload, _) in accepted.items():
        try:
            state.keys[site] = Advertisement.from_payload(
                upload.payload, site=site, session=state.session.key()
            )
        except SecAggMessageError as error:
            reject(ctx.plan, ctx.replies, ctx.round_number, site, f"{ADVERTISE_STAGE}: {error}")
            continue
        except Exception as error:  # unforeseen by the decoder: still this site's rejection
            reason = unexpected_failure(error, what=f"the {ADVERTISE_STAGE} payload of {site}")
            reject(ctx.plan, ctx.replies, ctx.round_number, site, reason)
            continue
        state.adverts[site] = SignedPayload(site, upload.payload, upload.signature)
    require_sites(ctx, state, "advertise_keys", list(state.adverts))


def share_keys(ctx: SecAggRound, state: SecAggState) -> None:
    """Stage 2: relay U1's adverts; collect each site's sealed shares for its peers (U2)."""
    relayed = adverts_record([state.adverts[site] for site in sorted(state.adverts)])
    contents = {
        state.node_of[site]: session_content(state, {ADVERTS_KEY: relayed})
        for site in state.adverts
    }
    accepted = exchange(
        ctx,
        state,
        contents,
        message_type=SHARE_MESSAGE,
        stage=SHARE_STAGE,
        max_bytes=_SMALL_UPLOAD_BYTES,
    )
    for site, (upload, _) in accepted.items():
        peers = set(state.adverts) - {site}
        try:
            state.sealed[site] = decode_sealed_map(upload.payload, site=site, recipients=peers)
        except SecAggMessageError as error:
            reject(ctx.plan, ctx.replies, ctx.round_number, site, f"{SHARE_STAGE}: {error}")
        except Exception as error:  # unforeseen by the decoder: still this site's rejection
            reason = unexpected_failure(error, what=f"the {SHARE_STAGE} payload of {site}")
            reject(ctx.plan, ctx.replies, ctx.round_number, site, reason)
    require_sites(ctx, state, "share_keys", list(state.sealed))


def train_contents(
    ctx: SecAggRound, state: SecAggState, cohort: list[str]
) -> dict[int, RecordDict]:
    """Each cohort site's train instruction, with the session: what the input stage adds to.

    The global adapter's record is built once and shared by every site's content.
    """
    task_dp = dp_task(ctx.plan.config)
    lora = LoraSpec.of(ctx.plan.config.lora)
    global_record = adapter_to_record(ctx.global_state)
    contents = {}
    for site in cohort:
        node = state.node_of[site]
        content = train_instruction(global_record, ctx.tasks[node], task_dp, lora)
        content[SECAGG_KEY] = session_content(state)[SECAGG_KEY]
        contents[node] = content
    return contents


def accept_input(
    ctx: SecAggRound,
    upload: SignedUpload,
    dp_event: Mapping[str, str | int | float] | None,
    policy: SignedPolicy,
    claims: SignedClaims,
) -> None:
    """Ledger an input-stage upload that passed its checks: it goes into the secure sum."""
    accept(
        ctx.plan,
        ctx.replies,
        node=upload.node,
        binding=upload.binding,
        signature=upload.signature,
        payload_bytes=len(upload.payload),
        dp_event=dp_event,
        policy=policy,
        claims=claims,
    )


def collect_masked_inputs(ctx: SecAggRound, state: SecAggState) -> None:
    """Stage 3: each site of U2 gets its shares and the task; collect masked inputs (U3)."""
    cohort = sorted(state.sealed)
    contents = train_contents(ctx, state, cohort)
    for site in cohort:
        contents[state.node_of[site]][SHARES_KEY] = shares_record(
            {sender: state.sealed[sender][site] for sender in cohort if sender != site}
        )
    accepted = exchange(
        ctx,
        state,
        contents,
        message_type=MASKED_MESSAGE,
        stage=MASKED_STAGE,
        max_bytes=ctx.plan.config.federation.max_update_bytes,
    )
    expected_bytes = 4 * state.length
    site_keys = ctx.plan.membership.site_keys()
    for site, (upload, reply) in accepted.items():
        try:
            if len(upload.payload) != expected_bytes:
                raise UpdateRejectedError(
                    site,
                    f"masked vector from {site} has {len(upload.payload)} bytes; expected "
                    f"{expected_bytes} ({state.length} uint32 words, one per adapter value)",
                )
            dp_event = check_dp_event(reply.content, dp_requirement(ctx.plan.config), site)
            policy = check_policy_declaration(reply.content, site_keys[site], upload.binding)
            claims = check_claims(
                reply.content, site_keys[site], upload.binding, metrics=None, dp_event=dp_event
            )
        except UpdateRejectedError as rejection:
            reject(
                ctx.plan, ctx.replies, ctx.round_number, site, f"{MASKED_STAGE}: {rejection.reason}"
            )
            continue
        accept_input(ctx, upload, dp_event, policy, claims)
        state.masked[site] = np.frombuffer(upload.payload, dtype="<u4").astype(RING_DTYPE)
    require_sites(ctx, state, "collect_masked_inputs", list(state.masked))


def check_consistency(ctx: SecAggRound, state: SecAggState) -> None:
    """Stage 4: each site of U3 signs the set U3; collect the signatures (U4).

    A site that signed another statement is left out. The set and every signature are
    ledgered, so an auditor can check what each survivor agreed to.
    """
    survivors = sorted(state.masked)
    statement = survivor_statement(state.session, survivors)
    request = survivors_record(survivors)
    contents = {
        state.node_of[site]: session_content(state, {SURVIVORS_KEY: request}) for site in survivors
    }
    accepted = exchange(
        ctx,
        state,
        contents,
        message_type=CONSISTENCY_MESSAGE,
        stage=CONSISTENCY_STAGE,
        max_bytes=_SMALL_UPLOAD_BYTES,
    )
    for site, (upload, _) in accepted.items():
        if upload.payload != statement:
            reason = f"{CONSISTENCY_STAGE}: {site} signed a statement other than the survivor set"
            reject(ctx.plan, ctx.replies, ctx.round_number, site, reason)
            continue
        state.survivor_signatures[site] = upload.signature
    signatures: dict[str, JsonValue] = {
        site: encode_signature(signature)
        for site, signature in sorted(state.survivor_signatures.items())
    }
    evidence: dict[str, JsonValue] = {"survivors": list(survivors), "signatures": signatures}
    require_sites(ctx, state, "check_consistency", list(state.survivor_signatures), evidence)


def unmask(ctx: SecAggRound, state: SecAggState) -> None:
    """Stage 5: forward U4's signatures on U3 and ask U4 for the shares owed; rebuild the
    secrets; unmask the sum of U3 (the inputs of sites that did not sign are in it too)."""
    survivors = sorted(state.masked)
    dropped = sorted(set(state.sealed) - set(state.masked))
    records = {
        UNMASK_KEY: unmask_record(survivors, dropped),
        SURVIVOR_SIGNATURES_KEY: survivor_signatures_record(state.survivor_signatures),
    }
    contents = {
        state.node_of[site]: session_content(state, records) for site in state.survivor_signatures
    }
    accepted = exchange(
        ctx,
        state,
        contents,
        message_type=UNMASK_MESSAGE,
        stage=UNMASK_STAGE,
        max_bytes=_SMALL_UPLOAD_BYTES,
    )
    for site, (upload, _) in accepted.items():
        try:
            state.unmasking[site] = UnmaskReply.from_payload(
                upload.payload, site=site, survivors=set(survivors), dropped=set(dropped)
            )
        except SecAggMessageError as error:
            reject(ctx.plan, ctx.replies, ctx.round_number, site, f"{UNMASK_STAGE}: {error}")
        except Exception as error:  # unforeseen by the decoder: still this site's rejection
            reason = unexpected_failure(error, what=f"the {UNMASK_STAGE} payload of {site}")
            reject(ctx.plan, ctx.replies, ctx.round_number, site, reason)
    sites = list(state.unmasking)
    if len(sites) < state.params.threshold:
        require_sites(ctx, state, "unmask", sites)
    try:
        recovery = recover_sum(
            session=state.session,
            threshold=state.params.threshold,
            adverts=state.keys,
            masked=state.masked,
            replies=state.unmasking,
            dropped=set(dropped),
        )
    except RecoveryError as error:
        reason = f"secure aggregation could not unmask the sum: {error}"
        evidence = _off_polynomial_evidence(error.off_polynomial)
        halt_stage(ctx, state, "unmask", sites, reason, evidence)
    require_sites(ctx, state, "unmask", sites, _off_polynomial_evidence(recovery.off_polynomial))
    check_sum_norm(
        ctx, state, "unmask", sites,
        contributors=len(state.masked),
        sum_norm=lambda: float(
            np.linalg.norm(dequantize(recovery.total, state.params.quantization()))
        ),
        what="unmasked",
    )  # fmt: skip
    state.total = recovery.total


def check_sum_norm(
    ctx: SecAggRound,
    state: SecAggState,
    stage: str,
    sites: list[str],
    *,
    contributors: int,
    sum_norm: Callable[[], float],
    what: str,
) -> None:
    """Halt the attempt at ``stage`` if the ``what`` sum of ``contributors`` inputs (its L2 norm
    computed by ``sum_norm``, only under distributed DP) is larger than clipped inputs and their
    noise can make it: a site sent an input it did not clip. Which site cannot be known (the
    inputs were masked or encrypted), so the round is retried, not one site rejected."""
    bound = state.params.sum_norm_bound(contributors=contributors, length=state.length)
    if bound is None:
        return
    norm = sum_norm()
    if norm > bound:
        reason = (
            f"the {what} sum of {contributors} inputs has L2 norm {norm:.6g}, above the "
            f"{bound:.6g} that inputs clipped to dp_clip_norm {state.params.dp_clip_norm:g} "
            "with their noise can reach: a site sent an unclipped input"
        )
        halt_stage(ctx, state, stage, sites, reason, {"sum_norm": norm, "sum_norm_bound": bound})


def _off_polynomial_evidence(off: Mapping[str, list[str]]) -> dict[str, JsonValue]:
    """The unmasking's shares that did not fit their secret, for the ledger: per owner, the
    holders whose share was off the polynomial (sent wrong, or dealt wrong by the owner: the
    server cannot tell which, so it names both and rejects neither)."""
    if not off:
        return {}
    for owner, holders in sorted(off.items()):
        log.warning(
            "secure aggregation: shares of %s held by %s are off the polynomial the other "
            "shares and its commitment fit (sent wrong by the holder or dealt wrong by %s); "
            "the rebuild left them out",
            owner,
            ", ".join(holders),
            owner,
        )
    return {"off_polynomial": {owner: list(holders) for owner, holders in sorted(off.items())}}


_NO_PARAMS = SecAggParams(
    threshold=2, cohort_size=2, clip=1.0, dp_clip_norm=0.0, dp_noise_multiplier=0.0
)

Stage = Callable[[SecAggRound, SecAggState], None]
STAGES: tuple[Stage, ...] = (
    advertise_keys,
    share_keys,
    collect_masked_inputs,
    check_consistency,
    unmask,
)


def secagg_params(plan: FederationPlan, cohort_size: int) -> SecAggParams:
    """The round's parameters from the run's configuration."""
    config = plan.config
    privacy = config.privacy
    return SecAggParams(
        threshold=config.secure_threshold,
        cohort_size=cohort_size,
        clip=config.secure_aggregation.clip,
        dp_clip_norm=privacy.site_clip_norm if privacy.site_level else 0.0,
        dp_noise_multiplier=privacy.site_noise_multiplier if privacy.site_level else 0.0,
    )


def run_stages(
    ctx: SecAggRound, state: SecAggState, stages: Sequence[Callable[[SecAggRound, Any], None]]
) -> None:
    """Run ``stages`` in turn; a halt ends the attempt cleanly, noted in the replies."""
    try:
        for stage in stages:
            stage(ctx, state)
    except StageHaltedError as halt:
        ctx.replies.failures["secure-aggregation"] = str(halt)
    except Exception as error:  # a defect of ours: halt this attempt cleanly, ledgered
        reason = unexpected_failure(error, what=f"secure aggregation stage {stage.__name__}")
        outcome: dict[str, JsonValue] = {
            "round": state.session.round,
            "attempt": state.session.attempt,
            "stage": stage.__name__,
            "sites": [],
            "threshold": state.params.threshold,
            "outcome": "halted",
            "reason": reason,
        }
        ctx.plan.ledger.append(EntryKind.SECURE_AGGREGATION_STAGE, outcome)
        state.stages.append(outcome)
        ctx.replies.failures["secure-aggregation"] = reason
    ctx.replies.stages = state.stages


def secure_sum(
    grid: Grid,
    plan: FederationPlan,
    global_state: AdapterState,
    *,
    round_number: int,
    attempt: int,
    nodes: list[int],
) -> tuple[SecAggState, RoundReplies]:
    """Open the round and run the five stages; ``state.total`` is None if they halted."""
    tasks = open_round(plan, global_state, round_number=round_number, attempt=attempt, nodes=nodes)
    membership = plan.membership
    replies = RoundReplies()
    try:
        params = secagg_params(plan, len(nodes))
    except SecAggMessageError as error:  # fewer nodes online than the threshold needs
        replies.failures["secure-aggregation"] = str(error)
        return SecAggState(SessionId("", "", round_number, attempt), _NO_PARAMS, 0, []), replies
    state = SecAggState(
        session=SessionId(membership.federation_id, membership.run_id, round_number, attempt),
        params=params,
        length=flat_length(global_state),
        nodes=list(nodes),
    )
    run_stages(SecAggRound(grid, plan, global_state, tasks, round_number, replies), state, STAGES)
    return state, replies


def collect_secure_round(
    grid: Grid,
    plan: FederationPlan,
    global_state: AdapterState,
    *,
    round_number: int,
    attempt: int,
    nodes: list[int],
) -> RoundReplies:
    """A secure round's replies: one aggregate update, the mean of the survivors' inputs."""
    state, replies = secure_sum(
        grid, plan, global_state, round_number=round_number, attempt=attempt, nodes=nodes
    )
    if state.total is None:
        return replies
    contributors = sorted(state.masked)
    total = dequantize(state.total, state.params.quantization())
    mean = unflatten(total / len(contributors), global_state)
    replies.updates.add(SiteUpdate(AGGREGATE_SITE, mean, len(contributors)))
    replies.contributors = contributors
    return replies
