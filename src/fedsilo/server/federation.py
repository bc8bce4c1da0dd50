"""The server's main loop on Flower's Message API: rounds, dropouts, checkpoints, resume.

One round: send the global adapter and the round task to the sampled sites, wait (bounded) for
replies, validate each reply whole, and aggregate only if at least ``min_sites`` valid updates
arrived. Otherwise the round is retried from the same global state, and after
``max_round_attempts`` the run stops with a message naming every site and why it failed.
Nothing is half-applied: the global adapter changes only by a completed aggregation, and each
aggregated round is checkpointed before it is reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedsilo.config import FedsiloConfig
from fedsilo.evaluation.metrics import GoldMetrics
from fedsilo.model.adapters import AdapterState
from fedsilo.protocol.records import (
    METRICS_KEY,
    SITE_KEY,
    UPDATE_KEY,
    ProtocolError,
    RoundTask,
    SiteMetrics,
    adapter_from_record,
    train_instruction,
)
from fedsilo.server.run_folder import Checkpoint, RunFolder
from fedsilo.server.strategies import SiteUpdate, Strategy

log = logging.getLogger(__name__)

TRAIN_MESSAGE = "train"


class FederationError(RuntimeError):
    """The run cannot go on (for example: too few sites answered, after every retry)."""


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

    updates: list[SiteUpdate] = field(default_factory=list)
    metrics: dict[str, SiteMetrics] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # site or node -> reason


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


def _site_seed(seed: int, round_number: int, node_id: int) -> int:
    return int(np.random.SeedSequence([seed, round_number, node_id]).generate_state(1)[0])


def sample_sites(
    node_ids: Iterable[int], *, count: int | None, seed: int, round_number: int, attempt: int
) -> list[int]:
    """The nodes asked to train in this round attempt (all of them when ``count`` is None)."""
    nodes = sorted(node_ids)
    if count is None or count >= len(nodes):
        return nodes
    rng = np.random.default_rng([seed, round_number, attempt])
    return sorted(int(node) for node in rng.choice(nodes, size=count, replace=False))


def _round_task(
    config: FedsiloConfig, plan: FederationPlan, round_number: int, node: int
) -> RoundTask:
    train = config.train
    return RoundTask(
        run_name=config.run.name,
        round=round_number,
        base_model_hash=plan.base_model_hash,
        local_steps=train.local_steps,
        batch_size=train.batch_size,
        learning_rate=train.learning_rate,
        max_length=train.max_length,
        max_grad_norm=train.max_grad_norm or 0.0,
        proximal_mu=plan.strategy.site_settings().proximal_mu,
        seed=_site_seed(config.run.seed, round_number, node),
    )


def _site_name(reply: Message, node: int) -> str:
    if SITE_KEY in reply.content.config_records:
        name = reply.content.config_records[SITE_KEY].get("name")
        if isinstance(name, str) and name:
            return name
    return f"node-{node}"


def collect_round(
    grid: Grid,
    plan: FederationPlan,
    global_state: AdapterState,
    *,
    round_number: int,
    nodes: Sequence[int],
) -> RoundReplies:
    """Send the round's task to ``nodes`` and validate what comes back."""
    config = plan.config
    messages = [
        Message(
            train_instruction(global_state, _round_task(config, plan, round_number, node)),
            dst_node_id=node,
            message_type=TRAIN_MESSAGE,
            group_id=str(round_number),
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=config.strategy.round_timeout_s))
    result = RoundReplies()
    answered: set[int] = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            result.failures[f"node-{node}"] = f"site error: {reply.error.reason}"
            continue
        site = _site_name(reply, node)
        try:
            delta = adapter_from_record(
                reply.content.array_records[UPDATE_KEY],
                like=global_state,
                what=f"update from {site}",
            )
            metrics = SiteMetrics.from_record(reply.content.metric_records[METRICS_KEY])
        except (ProtocolError, KeyError) as error:
            reason = f"rejected: {error}"
            result.failures[site] = reason
            log.warning("round %d: %s %s", round_number, site, reason)
            continue
        result.updates.append(SiteUpdate(site=site, delta=delta, num_examples=metrics.num_examples))
        result.metrics[site] = metrics
    for node in nodes:
        if node not in answered:
            result.failures[f"node-{node}"] = (
                f"no reply within {config.strategy.round_timeout_s:g} s"
            )
    return result


def _weighted_train_loss(replies: RoundReplies) -> float:
    total = sum(m.num_examples for m in replies.metrics.values())
    return sum(m.train_loss * m.num_examples for m in replies.metrics.values()) / total


def _gold_fields(metrics: GoldMetrics) -> dict[str, Any]:
    return {
        "gold_accuracy": metrics.accuracy,
        "gold_category_accuracy": metrics.category_accuracy,
        "gold_loss": metrics.loss,
        "gold_count": metrics.count,
    }


def _adapter_bytes(adapter: AdapterState) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in adapter.values())


def run_federation(grid: Grid, plan: FederationPlan, *, resume: bool) -> AdapterState:
    """Run (or resume) all rounds; return the final global adapter."""
    config, folder, strategy = plan.config, plan.folder, plan.strategy
    start_round, global_state = _starting_point(plan, resume=resume)

    for round_number in range(start_round, config.run.rounds + 1):
        started = time.perf_counter()
        replies = RoundReplies()
        for attempt in range(1, config.strategy.max_round_attempts + 1):
            nodes = sample_sites(
                grid.get_node_ids(),
                count=config.strategy.sites_per_round,
                seed=config.run.seed,
                round_number=round_number,
                attempt=attempt,
            )
            replies = collect_round(
                grid, plan, global_state, round_number=round_number, nodes=nodes
            )
            if len(replies.updates) >= config.strategy.min_sites:
                break
            plan.reporter.notice(
                f"round {round_number} attempt {attempt}: only {len(replies.updates)} of "
                f"{len(nodes)} sites returned a valid update (min_sites="
                f"{config.strategy.min_sites}); {_describe(replies.failures)}"
            )
        else:
            raise FederationError(
                f"round {round_number}: fewer than min_sites={config.strategy.min_sites} valid "
                f"updates after {config.strategy.max_round_attempts} attempts; "
                f"{_describe(replies.failures)}. The last checkpoint is intact: fix the sites "
                f"and resume with --resume {folder.root}"
            )

        global_state = strategy.aggregate(global_state, replies.updates)
        gold = plan.evaluate(global_state)
        record = {
            "round": round_number,
            "attempts": attempt,
            "sites_ok": len(replies.updates),
            "sites_failed": len(replies.failures),
            "sites": sorted(update.site for update in replies.updates),
            "failures": replies.failures,
            "train_loss": _weighted_train_loss(replies),
            "examples": sum(update.num_examples for update in replies.updates),
            "tokens": sum(m.tokens for m in replies.metrics.values()),
            "bytes_down_per_site": _adapter_bytes(global_state),
            "bytes_up_per_site": _adapter_bytes(replies.updates[0].delta),
            **_gold_fields(gold),
            "seconds": time.perf_counter() - started,
        }
        folder.save_checkpoint(
            Checkpoint(round_number, global_state, strategy.state_dict(), record)
        )
        folder.append_metrics(record)
        plan.reporter.round_done(record, total_rounds=config.run.rounds)
    return global_state


def _describe(failures: dict[str, str]) -> str:
    if not failures:
        return "no failures reported"
    return "; ".join(f"{site}: {reason}" for site, reason in sorted(failures.items()))


def _starting_point(plan: FederationPlan, *, resume: bool) -> tuple[int, AdapterState]:
    """Round to start at and the global adapter to start from; writes the round-0 baseline."""
    folder = plan.folder
    last = folder.latest_checkpoint_round() if resume else None
    if last is not None:
        checkpoint = folder.load_checkpoint(last)
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
    "collect_round",
    "run_federation",
    "sample_sites",
]
