"""The server's main loop on Flower's Message API: rounds, dropouts, checkpoints, resume.

One round: send the global adapter and the round task to the sampled sites, wait (bounded) for
replies, validate each reply whole and fold it into the round's running sum as it arrives, and
aggregate only if at least ``min_sites`` valid updates arrived. Otherwise the round is retried
from the same global state (with site-level DP and sampling, from the same draw of sites), and
after ``max_round_attempts`` the run stops with a message naming every site and why it failed.
Nothing is half-applied: the global adapter changes only by a completed aggregation, and each
aggregated round is checkpointed before it is reported.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedsilo.config import FedsiloConfig
from fedsilo.crypto import Receipt, sign_receipt
from fedsilo.evaluation.metrics import GoldMetrics
from fedsilo.ledger import EntryKind, JsonValue, read_entries
from fedsilo.model.adapters import AdapterState
from fedsilo.privacy.events import SampledSitesGaussianEvent, event_from_json, event_to_json
from fedsilo.protocol.records import (
    RECEIPT_MESSAGE,
    TRAIN_MESSAGE,
    TRAIN_STAGE,
    LoraSpec,
    adapter_to_record,
    receipt_to_record,
    train_instruction,
)
from fedsilo.server.admission import (
    ExpectedBinding,
    UpdateRejectedError,
    admit_update,
    unexpected_failure,
)
from fedsilo.server.he_round import collect_he_round
from fedsilo.server.privacy_report import site_epsilons, site_level_epsilon
from fedsilo.server.returning_sites import wait_for_returning_sites
from fedsilo.server.rounds import (
    FederationPlan,
    GoldEvaluator,
    ProgressReporter,
    RoundReplies,
    accept,
    adapter_digest,
    dp_requirement,
    dp_task,
    open_round,
    reject,
    rejected_sender,
    stream_replies,
)
from fedsilo.server.run_folder import (
    SERVER_STATE_FILE,
    Checkpoint,
    check_server_state,
    record_digest,
    server_state_digest,
)
from fedsilo.server.secagg_round import collect_secure_round
from fedsilo.server.strategies import SiteUpdate

log = logging.getLogger(__name__)

RECEIPT_TIMEOUT_S = 120.0


class FederationError(RuntimeError):
    """The run cannot go on (for example: too few sites answered, after every retry)."""


def _json_map(values: dict[str, str]) -> dict[str, JsonValue]:
    return {key: value for key, value in values.items()}


def _site_dp_json(config: FedsiloConfig) -> dict[str, str | int | float]:
    event = SampledSitesGaussianEvent(
        noise_multiplier=config.privacy.site_noise_multiplier,
        sites_per_round=config.strategy.sites_per_round or config.num_sites,
        num_sites=config.num_sites,
        rounds=1,
    )
    return event_to_json(event)


def _site_dp_event(config: FedsiloConfig) -> JsonValue:
    if not config.privacy.site_level:
        return None
    return {key: value for key, value in _site_dp_json(config).items()}


def sample_sites(
    node_ids: Iterable[int],
    *,
    count: int | None,
    seed: int,
    round_number: int,
    attempt: int,
    secret: bool = False,
    roster_size: int | None = None,
) -> list[int]:
    """The nodes asked to train in this round attempt (all of them when ``count`` is None).

    With ``secret`` the draw comes from the operating system's secure random source instead
    of the run's seed: privacy amplification by sampling needs a sample nobody can predict.

    With ``roster_size`` the draw is ``count`` of the ``roster_size`` enrolled sites, online or
    not: the online nodes fill the first slots, every other slot stands for an enrolled site
    that is offline, and a drawn offline site is a dropout. Site-level DP accounts each round
    as ``count`` of ``roster_size`` sites; drawing from the online nodes only would give every
    online site a higher sampling rate than that, and the reported epsilon would understate
    the privacy loss.
    """
    nodes = sorted(node_ids)
    slots = max(len(nodes), roster_size or 0)
    if count is None or count >= slots:
        return nodes
    entropy = secrets.randbits(128) if secret else [seed, round_number, attempt]
    rng = np.random.default_rng(entropy)
    drawn = rng.choice(slots, size=count, replace=False)
    return sorted(nodes[int(slot)] for slot in drawn if slot < len(nodes))


def draws_sites_once_per_round(config: FedsiloConfig) -> bool:
    """Whether a round keeps one draw of sites across its attempts: site-level DP with
    sampling. The accounting allows one draw per round, so a retry asks the same sites
    again instead of drawing until enough online ones come up."""
    per_round = config.strategy.sites_per_round
    return config.privacy.site_level and per_round is not None and per_round < config.num_sites


def _notice_offline_draw(plan: FederationPlan, round_number: int, nodes: Sequence[int]) -> None:
    """Tell the operator when a draw from the roster took enrolled sites that are offline."""
    drawn = plan.config.strategy.sites_per_round or plan.config.num_sites
    if len(nodes) < drawn:
        plan.reporter.notice(
            f"round {round_number}: {drawn - len(nodes)} of the {drawn} sites drawn from the "
            f"{plan.config.num_sites} enrolled are offline and count as dropouts"
        )


def collect_round(
    grid: Grid,
    plan: FederationPlan,
    global_state: AdapterState,
    *,
    round_number: int,
    attempt: int,
    nodes: Sequence[int],
) -> RoundReplies:
    """Send the round's task to ``nodes``, admit or reject each reply, ledger every outcome.

    Every message carries the same global adapter record (built once, not once per site), and
    each accepted update is folded into the strategy's running sum as it arrives.
    """
    config = plan.config
    tasks = open_round(plan, global_state, round_number=round_number, attempt=attempt, nodes=nodes)
    task_dp = dp_task(config)
    lora = LoraSpec.of(config.lora)
    global_record = adapter_to_record(global_state)
    messages = [
        Message(
            train_instruction(global_record, task, task_dp, lora),
            dst_node_id=node,
            message_type=TRAIN_MESSAGE,
            group_id=str(round_number),
        )
        for node, task in tasks.items()
    ]
    expected = ExpectedBinding(
        federation_id=plan.membership.federation_id,
        run_id=plan.membership.run_id,
        round=round_number,
        stage=TRAIN_STAGE,
    )
    site_keys = plan.membership.site_keys()
    result = RoundReplies(updates=plan.strategy.new_sum())
    answered: set[int] = set()
    for node, reply in stream_replies(grid, messages, timeout=config.strategy.round_timeout_s):
        answered.add(node)
        # A reply is admitted and folded into the sum whole, or rejected and ledgered with its
        # reason; whatever fails while one reply is handled, the round goes on with the others.
        try:
            admitted = admit_update(
                reply,
                expected=expected,
                site_keys=site_keys,
                admitted_sites=result.metrics.keys(),
                like=global_state,
                max_bytes=config.federation.max_update_bytes,
                max_examples=config.federation.max_site_examples,
                dp_required=dp_requirement(config),
            )
            site = admitted.binding.site_id
            weighed = result.updates.checked(
                SiteUpdate(site, admitted.delta, admitted.metrics.num_examples)
            )
        except UpdateRejectedError as rejection:
            sender = rejected_sender(plan, node, reply, rejection.sender)
            reject(plan, result, round_number, sender, rejection.reason)
            continue
        except Exception as error:
            reason = unexpected_failure(error, what=f"the reply of {plan.node_label(node)}")
            reject(plan, result, round_number, plan.node_label(node), reason)
            continue
        accept(
            plan,
            result,
            node=admitted.node,
            binding=admitted.binding,
            signature=admitted.signature,
            payload_bytes=admitted.payload_size,
            dp_event=admitted.dp_event,
            policy=admitted.policy,
            claims=admitted.claims,
            metrics=admitted.metrics,
        )
        # Folded in only once its entry is durable (accept's promise).
        result.updates.fold(weighed)
        plan.node_sites[admitted.node] = site
        result.metrics[site] = admitted.metrics
    for node in nodes:
        if node not in answered:
            reason = f"no reply within {config.strategy.round_timeout_s:g} s"
            reject(plan, result, round_number, plan.node_label(node), reason)
    return result


def send_receipts(
    grid: Grid, plan: FederationPlan, replies: RoundReplies, round_number: int
) -> None:
    """Give each accepted site the coordinator's signed receipt for its ledgered update."""
    messages = []
    for node, binding, entry in replies.ledgered:
        receipt = Receipt(binding, ledger_seq=entry.seq, entry_hash=entry.entry_hash)
        messages.append(
            Message(
                receipt_to_record(receipt, sign_receipt(plan.coordinator_key, receipt)),
                dst_node_id=node,
                message_type=RECEIPT_MESSAGE,
                group_id=str(round_number),
            )
        )
    delivered = {
        reply.metadata.src_node_id
        for reply in grid.send_and_receive(messages, timeout=RECEIPT_TIMEOUT_S)
        if not reply.has_error()
    }
    for node, binding, _entry in replies.ledgered:
        if node not in delivered:
            plan.reporter.notice(
                f"round {round_number}: the receipt for {binding.site_id} was not "
                "delivered; the site can ask for it again from the ledger entry"
            )


def _weighted_train_loss(replies: RoundReplies) -> float | None:
    """Example-weighted mean loss of the sites that reported one (none do under DP)."""
    reported = [(m.train_loss, m.num_examples) for m in replies.metrics.values()]
    losses = [(loss, n) for loss, n in reported if loss is not None]
    if not losses:
        return None
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def _privacy_fields(plan: FederationPlan) -> dict[str, Any]:
    privacy = plan.config.privacy
    if not (privacy.record_level or privacy.site_level):
        return {}
    entries = read_entries(plan.ledger.path)
    fields: dict[str, Any] = {"delta": privacy.delta}
    if privacy.record_level:
        fields["epsilon"] = site_epsilons(
            entries, delta=privacy.delta, accountant=privacy.accountant
        )
    if privacy.site_level:
        # This round's event is ledgered with its round_aggregated entry, just after.
        fields["site_level_epsilon"] = site_level_epsilon(
            entries,
            delta=privacy.delta,
            accountant=privacy.accountant,
            pending=[event_from_json(_site_dp_json(plan.config))],
        )
    return fields


def _gold_fields(metrics: GoldMetrics) -> dict[str, Any]:
    """The headline gold figures (ICD-10: unseen codes of trained categories), every part's."""
    interval = metrics.category_accuracy_ci95
    return {
        "gold_accuracy": metrics.accuracy,
        "gold_category_accuracy": metrics.category_accuracy,
        "gold_loss": metrics.loss,
        "gold_count": metrics.count,
        "gold_category_accuracy_ci95": None if interval is None else list(interval),
        "gold_parts": {name: dict(figures) for name, figures in metrics.parts.items()},
    }


def _adapter_bytes(adapter: AdapterState) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in adapter.values())


def _training_speed(replies: RoundReplies) -> dict[str, Any]:
    """The round's tokens, local-training time and speed, padding and precision, as reported.

    Sites under DP withhold their tokens and time (they send 0 for both: a site that trained
    processed tokens): the sums are over the sites that reported, and null when none did, never
    a 0 that reads as no training. ``precision`` is the sites' common precision, "mixed" when
    they differ.
    """
    reported = [m for m in replies.metrics.values() if m.tokens > 0]
    seconds = sum(m.seconds for m in reported) if reported else None
    tokens = sum(m.tokens for m in reported) if reported else None
    precisions = sorted({m.precision for m in replies.metrics.values() if m.precision})
    # Sites report a share, not their computed positions (packed training computes a shared
    # prefix once, so positions are not tokens / (1 - share)): weight the shares by tokens.
    shares = [(m.padding_share, m.tokens) for m in reported if m.padding_share is not None]
    share_tokens = sum(tokens_ for _, tokens_ in shares)
    return {
        "tokens": tokens,
        "train_seconds": seconds,
        "train_tokens_per_s": tokens / seconds if tokens and seconds else None,
        "padding_share": sum(share * tokens_ for share, tokens_ in shares) / share_tokens
        if share_tokens > 0
        else None,
        "precision": precisions[0] if len(precisions) == 1 else ("mixed" if precisions else None),
    }


def _bytes_up_per_site(replies: RoundReplies, global_state: AdapterState) -> float:
    """Plain rounds: the fp32 adapter (updates have its shape); secure rounds: the mean upload
    over every stage."""
    if replies.bytes_up:
        return sum(replies.bytes_up.values()) / len(replies.bytes_up)
    return _adapter_bytes(global_state)


Collector = Callable[..., RoundReplies]
# secagg and he return one aggregate update (the mean of the contributors' inputs).
COLLECTORS: dict[str, Collector] = {
    "none": collect_round,
    "secagg": collect_secure_round,
    "he": collect_he_round,
}


def run_federation(grid: Grid, plan: FederationPlan, *, resume: bool) -> AdapterState:
    """Run (or resume) all rounds; return the final global adapter."""
    config, folder, strategy = plan.config, plan.folder, plan.strategy
    start_round, global_state = _starting_point(plan, resume=resume)
    fixed_draw = draws_sites_once_per_round(config)
    opened_attempts = _opened_attempts(plan) if resume else {}
    connected_at_last_draw = 0
    rejoin_wait_s = config.deployment.rejoin_wait_s if config.deployment else 0.0

    for round_number in range(start_round, config.run.rounds + 1):
        started = time.perf_counter()
        replies = RoundReplies()
        nodes: list[int] | None = None
        # A resumed round goes on numbering its attempts after those the ledger records
        # opened: an attempt is a session that sites open once (client.opened_sessions).
        first_attempt = opened_attempts.get(round_number, 0) + 1
        for attempt in range(first_attempt, first_attempt + config.strategy.max_round_attempts):
            if nodes is None or not fixed_draw:
                online = wait_for_returning_sites(
                    grid,
                    expected=connected_at_last_draw,
                    wait_s=rejoin_wait_s,
                    notice=plan.reporter.notice,
                    round_number=round_number,
                )
                connected_at_last_draw = len(online)
                nodes = sample_sites(
                    online,
                    count=config.strategy.sites_per_round,
                    seed=config.run.seed,
                    round_number=round_number,
                    attempt=attempt,
                    secret=config.privacy.site_level,
                    roster_size=config.num_sites if fixed_draw else None,
                )
                if fixed_draw:
                    _notice_offline_draw(plan, round_number, nodes)
            collect = COLLECTORS[config.secure_aggregation.mode]
            replies = collect(
                grid, plan, global_state, round_number=round_number, attempt=attempt, nodes=nodes
            )
            if replies.updates.count and len(replies.sites) >= config.strategy.min_sites:
                break
            plan.reporter.notice(
                f"round {round_number} attempt {attempt}: only {len(replies.sites)} of "
                f"{len(nodes)} sites returned a valid update (min_sites="
                f"{config.strategy.min_sites}); {_describe(replies.failures)}"
            )
        else:
            plan.ledger.append(
                EntryKind.ROUND_FAILED,
                {
                    "round": round_number,
                    "attempts": config.strategy.max_round_attempts,
                    "failures": _json_map(replies.failures),
                },
            )
            raise FederationError(
                f"round {round_number}: fewer than min_sites={config.strategy.min_sites} valid "
                f"updates after {config.strategy.max_round_attempts} attempts; "
                f"{_describe(replies.failures) if nodes else 'every site drawn is offline'}. "
                f"The last checkpoint is intact: fix the sites "
                f"and resume with --resume {folder.root}"
            )

        global_state = strategy.aggregate(global_state, replies.updates)
        gold = plan.evaluate(global_state) if config.scores_gold_after(round_number) else None
        record = {
            "round": round_number,
            "attempts": attempt - first_attempt + 1,
            "sites_ok": len(replies.sites),
            "sites_failed": len(replies.failures),
            "sites": replies.sites,
            "failures": replies.failures,
            "train_loss": _weighted_train_loss(replies),
            "examples": replies.updates.examples,
            **_training_speed(replies),
            "bytes_down_per_site": _adapter_bytes(global_state),
            "bytes_up_per_site": _bytes_up_per_site(replies, global_state),
            "secure_aggregation": config.secure_aggregation.mode,
            **({"secure_stages": replies.stages} if replies.stages else {}),
            **({} if gold is None else _gold_fields(gold)),
            **_privacy_fields(plan),
            "seconds": time.perf_counter() - started,
        }
        record = _finite_record(record, plan.reporter, round_number)
        # Ledger first: a crash before the checkpoint lands leaves an entry that a resumed run
        # supersedes, never a checkpoint the ledger does not account for.
        server_state = strategy.state_dict()
        plan.ledger.append(
            EntryKind.ROUND_AGGREGATED,
            {
                "round": round_number,
                "adapter_sha256": adapter_digest(global_state),
                # Binds the strategy's state (momentum, FedAdam moments) that a resumed run
                # applies: an edited one fails the audit and the resume.
                "server_state_sha256": server_state_digest(server_state),
                "sites": record["sites"],
                "examples": record["examples"],
                "strategy": strategy.name,
                "site_dp_event": _site_dp_event(config),
                # Binds metrics.jsonl and round.json: an edited gold accuracy fails the audit.
                "metrics_sha256": record_digest(record),
            },
        )
        folder.save_checkpoint(Checkpoint(round_number, global_state, server_state, record))
        folder.append_metrics(record)
        send_receipts(grid, plan, replies, round_number)
        plan.reporter.round_done(record, total_rounds=config.run.rounds)
    return global_state


def _finite_record(
    record: dict[str, Any], reporter: ProgressReporter, round_number: int
) -> dict[str, Any]:
    """``record`` with every NaN or infinite number (a diverged loss, an unbounded epsilon)
    replaced by null, and a notice naming them: metrics.jsonl and round.json stay JSON."""
    dropped: list[str] = []

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            dropped.append(path)
            return None
        if isinstance(value, dict):
            return {key: clean(item, f"{path}.{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [clean(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return value

    cleaned = {key: clean(value, key) for key, value in record.items()}
    if dropped:
        reporter.notice(f"round {round_number}: not finite, recorded as null: {dropped}")
    return cleaned


def _describe(failures: dict[str, str]) -> str:
    if not failures:
        return "no failures reported"
    return "; ".join(f"{site}: {reason}" for site, reason in sorted(failures.items()))


def _check_loaded_checkpoint(plan: FederationPlan, checkpoint: Checkpoint) -> None:
    """The tensors a resume is about to apply are the ones the ledger recorded.

    The resume check hashed the files before they were read again here, so the digests are
    taken of what was loaded. At round 0 the strategy's state must also be a fresh strategy's
    (nothing has been aggregated yet), whatever the ledger holds: ledgers written before the
    baseline entry recorded that digest could not bind it.
    """
    round_number = checkpoint.round
    where = plan.folder.checkpoint_dir(round_number)
    adapters: dict[int, str] = {}
    states: dict[int, str] = {}
    for entry in read_entries(plan.folder.ledger_path):
        payload = entry.payload
        if entry.kind is EntryKind.RUN_STARTED:
            adapters[0] = str(payload.get("initial_adapter_sha256"))
        elif entry.kind in (EntryKind.BASELINE_EVALUATED, EntryKind.ROUND_AGGREGATED):
            recorded_round = payload.get("round")
            if not isinstance(recorded_round, int):
                continue
            if entry.kind is EntryKind.ROUND_AGGREGATED:
                adapters[recorded_round] = str(payload.get("adapter_sha256"))
            digest = payload.get("server_state_sha256")
            if isinstance(digest, str):
                states[recorded_round] = digest
    if adapter_digest(checkpoint.adapter) != adapters.get(round_number):
        raise FederationError(
            f"{where}: the adapter loaded for resuming is not the one the ledger records for "
            f"round {round_number}"
        )
    state_digest = server_state_digest(checkpoint.server_state)
    recorded = states.get(round_number)
    if recorded is not None and state_digest != recorded:
        raise FederationError(
            f"{where / SERVER_STATE_FILE}: the strategy state loaded for resuming is not the one "
            f"the ledger records for round {round_number}"
        )
    fresh_digest = server_state_digest(plan.strategy.state_dict())
    if round_number == 0 and state_digest != fresh_digest:
        raise FederationError(
            f"{where / SERVER_STATE_FILE}: the strategy state loaded for resuming from round 0 "
            "is not a fresh strategy's (nothing is aggregated before round 1)"
        )


def _opened_attempts(plan: FederationPlan) -> dict[int, int]:
    """Round -> the highest attempt the ledger records opening."""
    highest: dict[int, int] = {}
    for entry in read_entries(plan.folder.ledger_path):
        if entry.kind is EntryKind.ROUND_OPENED:
            round_number, attempt = entry.payload.get("round"), entry.payload.get("attempt")
            if isinstance(round_number, int) and isinstance(attempt, int):
                highest[round_number] = max(attempt, highest.get(round_number, 0))
    return highest


def _starting_point(plan: FederationPlan, *, resume: bool) -> tuple[int, AdapterState]:
    """Round to start at and the global adapter to start from; writes the round-0 baseline."""
    folder = plan.folder
    last = folder.latest_checkpoint_round() if resume else None
    if last is not None:
        checkpoint = folder.load_checkpoint(last)
        check_server_state(
            checkpoint.server_state,
            like=checkpoint.adapter,
            what=str(folder.checkpoint_dir(last) / SERVER_STATE_FILE),
        )
        _check_loaded_checkpoint(plan, checkpoint)
        plan.strategy.load_state_dict(checkpoint.server_state)
        # metrics.jsonl may lag the checkpoints by one write: rebuild it from them.
        folder.write_metrics(
            [folder.read_round_record(r) for r in folder.checkpoint_rounds() if r <= last]
        )
        plan.reporter.notice(f"resuming after round {last} from {folder.checkpoint_dir(last)}")
        return last + 1, checkpoint.adapter

    started = time.perf_counter()
    gold = plan.evaluate(plan.initial_adapter)
    record = {
        "round": 0,
        "attempts": 0,
        "sites_ok": 0,
        "sites_failed": 0,
        "sites": [],
        "failures": {},
        "train_loss": None,
        "examples": 0,
        "tokens": 0,
        "bytes_down_per_site": 0,
        "bytes_up_per_site": 0,
        **_gold_fields(gold),
        "seconds": time.perf_counter() - started,
    }
    record = _finite_record(record, plan.reporter, 0)
    plan.ledger.append(
        EntryKind.BASELINE_EVALUATED,
        {
            "round": 0,
            "metrics_sha256": record_digest(record),
            "server_state_sha256": server_state_digest(plan.strategy.state_dict()),
        },
    )
    folder.save_checkpoint(Checkpoint(0, plan.initial_adapter, plan.strategy.state_dict(), record))
    folder.write_metrics([record])
    plan.reporter.round_done(record, total_rounds=plan.config.run.rounds)
    return 1, plan.initial_adapter


__all__ = [
    "TRAIN_MESSAGE",
    "FederationError",
    "FederationPlan",
    "GoldEvaluator",
    "ProgressReporter",
    "RoundReplies",
    "adapter_digest",
    "collect_round",
    "run_federation",
    "sample_sites",
]
