"""A Flower Grid that delivers messages to ClientApps in this process.

It runs the real ServerApp and ClientApp code, message for message, without Ray or a
SuperLink: a 4-site LoRA round needs a fraction of the time and memory. Three details matter
for fidelity: every message is deep-copied on the way (mods and handlers mutate records in
place, and across a real network nobody shares objects); messages carry the run id the
client side expects; and replies come back one per pull, in the order the messages were
pushed, as they would from sites finishing one after another. A site trains only when the
server pulls, so a server that handles each reply before pulling the next holds one reply at
a time, as it would over a network.

With ``lanes`` > 1, sites train side by side: node i runs in lane i mod ``lanes``, a worker
thread of its own with ``lane_threads`` torch threads, and the nodes of one lane take turns
(the simulated sites of a lane share one copy of the model: fedsilo.simulation.sites). A pull
starts every pending message it asks for; replies still come back in the order pushed. Torch
releases the GIL in its kernels, so two one-thread lanes on two cores train faster than one
two-thread process (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import logging
import traceback
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

FIRST_NODE_ID = 1000


class InProcessGrid(Grid):
    """Delivers each pushed message to the ClientApp of its destination node, synchronously.

    ``unreachable`` nodes never answer (a site that dropped out or timed out): their
    messages are accepted and no reply ever comes, as over a real network.
    """

    # Once a pull comes back empty nothing more will come: callers need not wait for timeouts.
    delivers_synchronously = True

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        run_id: int = 1,
        unreachable: Iterable[int] = (),
        lanes: int = 1,
        lane_threads: int = 1,
    ) -> None:
        if lanes < 1 or lane_threads < 1:
            raise ValueError(f"lanes ({lanes}) and lane_threads ({lane_threads}) must be >= 1")
        self._client_app = client_app
        self._run = Run.create_empty(run_id)
        self._contexts: dict[int, Context] = {
            FIRST_NODE_ID + index: Context(
                run_id=run_id,
                node_id=FIRST_NODE_ID + index,
                node_config={"partition-id": index, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for index in range(num_nodes)
        }
        self._unreachable = set(unreachable)
        # Pushed and not yet delivered: message id -> (message, destination node).
        self._pending: dict[str, tuple[Message, int]] = {}
        # Parallel lanes only: deliveries started and not yet pulled.
        self._started: dict[str, Future[Message]] = {}
        self._lanes = [
            ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"site-lane-{lane}",
                # Per thread: the lane's training is narrowed, not the server's evaluation.
                initializer=torch.set_num_threads,
                initargs=(lane_threads,),
            )
            for lane in range(lanes if lanes > 1 else 0)
        ]
        # Messages built by the ServerApp take their run and source node from here.
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 0

    @property
    def contexts(self) -> Mapping[int, Context]:
        """Each node's Context (its node_config and its local state)."""
        return self._contexts

    def set_unreachable(self, nodes: Iterable[int]) -> None:
        """From now on, these nodes do not answer."""
        self._unreachable = set(nodes)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for message in messages:
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = self._run.run_id
            ids.append(message_id)
            node = message.metadata.dst_node_id
            if node not in self._contexts:
                raise ValueError(f"message for unknown node {node}")
            if node in self._unreachable:
                continue
            self._pending[message_id] = (message, node)
        return ids

    def _deliver(self, message: Message, node: int) -> Message:
        try:
            reply = self._client_app(message, self._contexts[node])
        except Exception as error:  # a site's crash is a reply with an error, as in Flower
            log.warning("node %d raised %s: %s", node, type(error).__name__, error)
            reason = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}"
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
        reply = copy.deepcopy(reply)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The reply to the first pushed message among ``message_ids`` (empty when none)."""
        asked = set(message_ids)
        wanted = [message_id for message_id in self._pending if message_id in asked]
        if not wanted:
            return []
        first = wanted[0]
        if not self._lanes:
            message, node = self._pending.pop(first)
            return [self._deliver(copy.deepcopy(message), node)]
        for message_id in wanted:
            if message_id not in self._started:
                message, node = self._pending[message_id]
                lane = self._lanes[(node - FIRST_NODE_ID) % len(self._lanes)]
                self._started[message_id] = lane.submit(self._deliver, copy.deepcopy(message), node)
        del self._pending[first]
        return [self._started.pop(first).result()]

    def close(self) -> None:
        """Stop the lanes: deliveries not started are dropped, a running one is waited for."""
        for lane in self._lanes:
            lane.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> InProcessGrid:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        # Delivery is synchronous: whatever has not answered now never will, so the
        # timeout is reached at once instead of slept through.
        del timeout
        ids = list(self.push_messages(messages))
        replies: list[Message] = []
        while pulled := list(self.pull_messages(ids)):
            replies.extend(pulled)
        return replies
