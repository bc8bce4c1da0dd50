"""A Flower Grid that delivers messages to ClientApps in this process.

It runs the real ServerApp and ClientApp code, message for message, without Ray or a
SuperLink: a 4-site LoRA round needs a fraction of the time and memory. Three details matter
for fidelity: every message is deep-copied on the way (mods and handlers mutate records in
place, and across a real network nobody shares objects); messages carry the run id the
client side expects; and replies come back one per pull, in the order the messages were
pushed, as they would from sites finishing one after another. A site trains only when the
server pulls, so a server that handles each reply before pulling the next holds one reply at
a time, as it would over a network.
"""

from __future__ import annotations

import copy
import logging
import traceback
from collections.abc import Iterable, Mapping
from uuid import uuid4

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
    ) -> None:
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
        wanted = set(message_ids)
        for message_id, (message, node) in self._pending.items():
            if message_id in wanted:
                del self._pending[message_id]
                return [self._deliver(copy.deepcopy(message), node)]
        return []

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
