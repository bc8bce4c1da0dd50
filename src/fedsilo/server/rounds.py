"""What every kind of round shares: the plan, the replies of one attempt, tasks and rejections.

The plain round (:mod:`fedsilo.server.federation`) and the secure ones
(:mod:`fedsilo.server.secagg_round`, :mod:`fedsilo.server.he_round`) build on these, so a
round's ledger entries and failure reports look the same whatever the aggregation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedsilo.config import FedsiloConfig
from fedsilo.crypto import PrivateKey, UpdateBinding, encode_signature, sha256_hex
from fedsilo.evaluation.metrics import GoldMetrics
from fedsilo.ledger import Entry, EntryKind, JsonValue, Ledger
from fedsilo.ledger.entries import SITE_CLAIMS_FIELD, SITE_METRICS_FIELD, SITE_POLICY_FIELD
from fedsilo.model.adapters import AdapterState, adapter_to_bytes
from fedsilo.protocol.records import (
    TRAIN_STAGE,
    DpTask,
    RoundTask,
    SignedClaims,
    SignedPolicy,
    SiteMetrics,
)
from fedsilo.protocol.schedule import round_learning_rate
from fedsilo.report.reader_text import one_line
from fedsilo.server.admission import DpRequirement
from fedsilo.server.membership import Membership
from fedsilo.server.run_folder import RunFolder
from fedsilo.server.strategies import Strategy, UpdateSum

log = logging.getLogger(__name__)

# How often a round asks the grid for replies while it waits.
REPLY_POLL_S = 0.25


class GoldEvaluator(Protocol):
    """Scores a global adapter on the held-out gold set at the server."""

    def __call__(self, adapter: AdapterState) -> GoldMetrics: ...


class ProgressReporter(Protocol):
    """Receives each round's metrics record and free-text notices, for display."""

    def round_done(self, record: dict[str, Any], *, total_rounds: int) -> None: ...

    def notice(self, text: str) -> None: ...


@dataclass
class RoundReplies:
    """What came back in one attempt of a round."""

    # The accepted updates, folded into one running sum as they arrived (for secure rounds: the
    # one aggregate of the contributors' inputs).
    updates: UpdateSum = field(default_factory=UpdateSum)
    metrics: dict[str, SiteMetrics] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # site or node -> reason
    # Accepted uploads (node, signed binding) with the ledger entry that records each: what
    # receipts are issued for.
    ledgered: list[tuple[int, UpdateBinding, Entry]] = field(default_factory=list)
    # Secure aggregation: the sites whose inputs are in the one aggregate update, and the bytes
    # each uploaded over all stages (empty for a plain round).
    contributors: list[str] = field(default_factory=list)
    bytes_up: dict[str, int] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        """The sites whose updates went into this round."""
        return sorted(self.contributors or self.updates.sites)


@dataclass(frozen=True)
class FederationPlan:
    """Everything the server loop needs besides the grid."""

    config: FedsiloConfig
    folder: RunFolder
    base_model_hash: str
    initial_adapter: AdapterState
    strategy: Strategy
    evaluate: GoldEvaluator
    reporter: ProgressReporter
    membership: Membership
    ledger: Ledger
    coordinator_key: PrivateKey
    # node id -> the site its last accepted update was signed by: names a node that later
    # fails without a signature (no reply, a crash) in the failures and the ledger.
    node_sites: dict[int, str] = field(default_factory=dict)

    def node_label(self, node: int) -> str:
        """``node-<id>``, with the site it signed as earlier in the run when there is one."""
        site = self.node_sites.get(node)
        return f"node-{node} ({site})" if site else f"node-{node}"


def dp_task(config: FedsiloConfig) -> DpTask | None:
    """The record-level DP settings sent with each round (None without record-level DP)."""
    privacy = config.privacy
    if not privacy.record_level:
        return None
    return DpTask(
        noise_multiplier=privacy.noise_multiplier or 0.0,
        target_epsilon=privacy.target_epsilon or 0.0,
        max_grad_norm=privacy.max_grad_norm,
        delta=privacy.delta,
        accountant=privacy.accountant,
        planned_rounds=config.run.rounds,
    )


def dp_requirement(config: FedsiloConfig) -> DpRequirement | None:
    """What each site's record-level DP event must declare (None without record-level DP)."""
    privacy = config.privacy
    if not privacy.record_level:
        return None
    return DpRequirement(
        local_steps=config.train.local_steps or 0,
        local_epochs=config.train.local_epochs or 0.0,
        batch_size=config.train.batch_size,
        min_noise_multiplier=privacy.noise_multiplier or 0.0,
        max_records=config.federation.max_site_examples,
    )


def adapter_digest(adapter: AdapterState) -> str:
    """sha256 of the adapter's safetensors bytes: the bytes a checkpoint's adapter file holds."""
    return sha256_hex(adapter_to_bytes(adapter))


def _site_seed(seed: int, round_number: int, node_id: int) -> int:
    return int(np.random.SeedSequence([seed, round_number, node_id]).generate_state(1)[0])


def round_task(plan: FederationPlan, round_number: int, node: int, cohort_size: int) -> RoundTask:
    """The training instructions for ``node`` in this round."""
    config, train = plan.config, plan.config.train
    return RoundTask(
        federation_id=plan.membership.federation_id,
        run_id=plan.membership.run_id,
        stage=TRAIN_STAGE,
        run_name=config.run.name,
        round=round_number,
        cohort_size=cohort_size,
        base_model_hash=plan.base_model_hash,
        local_steps=train.local_steps or 0,
        local_epochs=train.local_epochs or 0.0,
        batch_size=train.batch_size,
        learning_rate=round_learning_rate(
            train.learning_rate,
            round_number=round_number,
            rounds=config.run.rounds,
            schedule=train.lr_schedule,
            warmup_rounds=train.warmup_rounds,
        ),
        max_length=train.max_length,
        max_grad_norm=train.max_grad_norm or 0.0,
        proximal_mu=plan.strategy.site_settings().proximal_mu,
        seed=_site_seed(config.run.seed, round_number, node),
    )


def open_round(
    plan: FederationPlan,
    global_state: AdapterState,
    *,
    round_number: int,
    attempt: int,
    nodes: Sequence[int],
) -> dict[int, RoundTask]:
    """Ledger the round's opening and each node's task; return the tasks."""
    tasks = {node: round_task(plan, round_number, node, len(nodes)) for node in nodes}
    plan.ledger.append(
        EntryKind.ROUND_OPENED,
        {
            "round": round_number,
            "attempt": attempt,
            "nodes": list(nodes),
            "global_adapter_sha256": adapter_digest(global_state),
            "secure_aggregation": plan.config.secure_aggregation.mode,
        },
    )
    for node, task in tasks.items():
        plan.ledger.append(
            EntryKind.TASK_SENT,
            {"round": round_number, "attempt": attempt, "node": node, "task": asdict(task)},
        )
    return tasks


def reject(
    plan: FederationPlan, result: RoundReplies, round_number: int, sender: str, reason: str
) -> None:
    """Ledger and report a reply (or a missing one) that is not used.

    The ledger and the run's metrics get the reason as one line without traceback or local
    paths (they are read by auditors); the coordinator's log gets the text quoted (newlines and
    control characters escaped, so a site's words cannot forge log lines) up to 4,000 characters.
    """
    short = one_line(reason)
    plan.ledger.append(
        EntryKind.UPDATE_REJECTED, {"round": round_number, "sender": sender, "reason": short}
    )
    result.failures[sender] = short
    log.warning("round %d: %s rejected: %r", round_number, sender, reason[:4000])


def rejected_sender(plan: FederationPlan, node: int, reply: Message, sender: str) -> str:
    """Who a rejected reply is reported as.

    ``sender`` is what admission named: the signing site, or ``node-<id>`` for a reply with no
    signature to go by. Such a reply, and one Flower relayed for the node, is named by
    :meth:`FederationPlan.node_label`; so is a reply signed by another site than the one the
    node has signed as: a site relaying another's signed message (an old advertisement, a
    stale update) gets the rejection, not the site it copied.
    """
    unsigned = node != reply.metadata.src_node_id or sender.startswith("node-")
    return plan.node_label(node) if unsigned or not answers_for(plan, node, sender) else sender


def answers_for(plan: FederationPlan, node: int, site: str) -> bool:
    """Whether ``site`` may be answering from ``node``: the node has signed as no other site in
    this run. (A node new to the run may be a site's restarted SuperNode: it is not refused.)"""
    known_site = plan.node_sites.get(node)
    return known_site is None or known_site == site


def accept(
    plan: FederationPlan,
    result: RoundReplies,
    *,
    node: int,
    binding: UpdateBinding,
    signature: bytes,
    payload_bytes: int,
    dp_event: Mapping[str, str | int | float] | None,
    policy: SignedPolicy,
    claims: SignedClaims,
    metrics: SiteMetrics | None = None,
) -> Entry:
    """Ledger an accepted upload, with the policy its site declared and its signed claims (its
    metrics, when it sends any, and its DP event), and keep it for its receipt.

    The entry is durable before the upload can influence anything.
    """
    fields: dict[str, JsonValue] = {
        **binding.fields(),
        "site_signature": encode_signature(signature),
        "node": node,
        "payload_bytes": payload_bytes,
        "dp_event": None if dp_event is None else dict(dp_event),
        SITE_POLICY_FIELD: dict(policy.ledger_fields()),
        SITE_METRICS_FIELD: None if metrics is None else dict(metrics.claim_fields()),
        SITE_CLAIMS_FIELD: dict(claims.ledger_fields()),
    }
    if metrics is not None:
        fields["num_examples"] = metrics.num_examples
    entry = plan.ledger.append(EntryKind.UPDATE_RECEIVED, fields)
    result.ledgered.append((node, binding, entry))
    return entry


def _one_by_one(pulled: Iterable[Message]) -> Iterator[Message]:
    """The replies of one pull, holding none that was already handled.

    A list (Flower's in-memory grid) is emptied as it is read; any other iterable (the deployed
    grid) is read lazily, as it pulls and inflates a reply only when it is reached.
    """
    if isinstance(pulled, list):
        pulled.reverse()
        while pulled:
            yield pulled.pop()
    else:
        yield from pulled


@runtime_checkable
class DeadlinePulls(Protocol):
    """A grid whose pulls can give up on a reply's missing objects at a deadline (the deployed
    coordinator's :class:`fedsilo.deploy.bounded_grid.BoundedHttpGrid`)."""

    def pull_messages_by(
        self, message_ids: Iterable[str], deadline: float
    ) -> Iterable[Message]: ...


def stream_replies(
    grid: Grid, messages: Sequence[Message], *, timeout: float
) -> Iterator[tuple[int, Message]]:
    """Send ``messages``; yield each reply, with the node it answers for, as it arrives.

    The caller handles one reply before the next is pulled from the list, so a round can fold
    each update into its sum and let it go instead of holding one reply per site. Grids set
    each sent message's id; a reply made by Flower itself (say, "node unavailable") comes from
    the SuperLink, not the node, and is matched to its node through that id. Stops when every
    message is answered or ``timeout`` seconds have passed; a grid that delivers synchronously
    (``delivers_synchronously``) has nothing more to give once a pull comes back empty. Where
    the grid can (:class:`DeadlinePulls`), a reply whose objects are still missing at the
    deadline fails as its node's instead of holding the stage.
    """
    pending = set(grid.push_messages(messages))
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    synchronous = getattr(grid, "delivers_synchronously", False)
    deadline = time.monotonic() + timeout
    while pending:
        # The ids are copied: ``pending`` shrinks while the pull is read.
        arrived = False
        pulled = (
            grid.pull_messages_by(list(pending), deadline)
            if isinstance(grid, DeadlinePulls)
            else grid.pull_messages(list(pending))
        )
        for reply in _one_by_one(pulled):
            arrived = True
            answered = reply.metadata.reply_to_message_id
            pending.discard(answered)
            yield sent_to.get(answered, reply.metadata.src_node_id), reply
            del reply
        if not arrived:
            left = deadline - time.monotonic()
            if synchronous or left <= 0:
                return
            time.sleep(min(REPLY_POLL_S, left))


def send_and_attribute(
    grid: Grid, messages: Sequence[Message], *, timeout: float
) -> list[tuple[int, Message]]:
    """Every reply of :func:`stream_replies`, for stages that need all of them at once."""
    return list(stream_replies(grid, messages, timeout=timeout))
