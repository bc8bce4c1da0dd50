"""The coordinator's bounded grid against Flower's own SuperLink state, without a deployment.

Sites push replies through Flower's Fleet API handlers into an in-memory LinkState and object
store; the grid reaches the same state through Flower's Runtime API handlers, called by a
client that stands in for the HTTP one. What is faked is the transport only: no HTTP, no
nginx, no TLS, no token checks.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import NOOP_FLWR_AID, SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.fleet_pb2 import PullMessagesRequest, PushMessagesRequest
from flwr.proto.message_pb2 import (
    ConfirmMessageReceivedRequest,
    ConfirmMessageReceivedResponse,
    ObjectTree,
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullAppMessagesResponse,
    PushAppMessagesRequest,
    PushAppMessagesResponse,
)
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.constant import (
    NOOP_FEDERATION_ID,
    TaskType,
)
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
from flwr.superlink.servicer.fleet import fleet_handlers
from flwr.superlink.servicer.runtime import runtime_handlers

from fedsilo.deploy.bounded_grid import BoundedHttpGrid, ReplyLimits
from fedsilo.server.rounds import stream_replies

from .crafted_objects import crafted_message

MIB = 1024 * 1024
MAX_UPDATE = 10 * MIB


class LinkRuntime:
    """The Runtime API client the grid calls, answered by Flower's Runtime API handlers."""

    def __init__(self, state: InMemoryLinkState, task: Task) -> None:
        self.state, self.task = state, task
        self.pulled_objects: list[str] = []

    def PushMessages(self, request: PushAppMessagesRequest) -> PushAppMessagesResponse:  # noqa: N802
        return runtime_handlers.push_messages(request, self.state, self.task)

    def PushObject(self, request: PushObjectRequest) -> PushObjectResponse:  # noqa: N802
        return runtime_handlers.push_object(request, self.state, self.task)

    def PullMessages(self, request: PullAppMessagesRequest) -> PullAppMessagesResponse:  # noqa: N802
        return runtime_handlers.pull_messages(request, self.state, self.task)

    def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802
        self.pulled_objects.append(request.object_id)
        return runtime_handlers.pull_object(request, self.state, self.task)

    def ConfirmMessageReceived(  # noqa: N802
        self, request: ConfirmMessageReceivedRequest
    ) -> ConfirmMessageReceivedResponse:
        return runtime_handlers.confirm_message_received(request, self.state, self.task)


@dataclass
class Link:
    state: InMemoryLinkState
    store: InMemoryObjectStore
    grid: BoundedHttpGrid
    runtime: LinkRuntime
    nodes: list[int]
    sent: dict[int, Message] = field(default_factory=dict)


@pytest.fixture
def link(monkeypatch: pytest.MonkeyPatch) -> Iterator[Link]:
    store = InMemoryObjectStore()
    state = InMemoryLinkState(NoOpFederationManager(), store)
    run_id = state.create_run(
        None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, TaskType.SERVER_APP.value
    )
    acquired = runtime_handlers.acquire_task(
        AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP.value]), state
    )
    assert state.activate_task(acquired.task.task_id)
    # Who is sending, as the coordinator sets it from its task before running the ServerApp.
    monkeypatch.setattr(TaskIdentity, "_task_id", acquired.task.task_id)
    monkeypatch.setattr(TaskIdentity, "_run_id", run_id)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    nodes = []
    for name in ("site-a", "site-b"):
        node = state.create_node(NOOP_FLWR_AID, name, name.encode(), heartbeat_interval=60.0)
        assert state.activate_node(node, heartbeat_interval=60.0)
        nodes.append(node)
    runtime = LinkRuntime(state, acquired.task)
    grid = BoundedHttpGrid("127.0.0.1:1", token="token", max_update_bytes=MAX_UPDATE)
    grid._client = runtime  # type: ignore[assignment]
    grid.set_run(Run.create_empty(run_id))
    yield Link(state, store, grid, runtime, nodes)
    grid._client = None


def send_tasks(link: Link) -> None:
    """The coordinator sends each node a task through the grid, as a round does."""
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type="train", group_id="1")
        for node in link.nodes
    ]
    assert all(link.grid.push_messages(messages))
    for node in link.nodes:
        response = fleet_handlers.pull_messages(
            PullMessagesRequest(node=Node(node_id=node)), link.state, link.store
        )
        (task,) = response.messages_list
        link.sent[node] = message_from_proto(task)


def push_reply(
    link: Link,
    node: int,
    envelope: ProtoMessage,
    tree: ObjectTree,
    contents: dict[str, bytes],
    withhold: int = 0,
) -> str:
    """What a SuperNode does: push the reply and its tree, then every object asked for (but
    the last ``withhold`` of them, which a hostile site lists and never uploads)."""
    response = fleet_handlers.push_messages(
        PushMessagesRequest(
            node=Node(node_id=node), messages_list=[envelope], message_object_trees=[tree]
        ),
        link.state,
    )
    asked = list(response.objects_to_push)
    for object_id in asked[: len(asked) - withhold]:
        request = PushObjectRequest(
            node=Node(node_id=node),
            run_id=link.grid.run.run_id,
            object_id=object_id,
            object_content=contents[object_id],
            session_id=response.session_id,
        )
        assert fleet_handlers.push_object(request, link.state).stored
    return envelope.metadata.message_id


def honest_reply(link: Link, node: int, content: RecordDict) -> str:
    reply = Message(content, reply_to=link.sent[node])
    reply.metadata.__dict__["_message_id"] = reply.object_id
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
    envelope = message_to_proto(remove_content_from_message(reply))
    return push_reply(link, node, envelope, get_object_tree(reply), contents)


def crafted_reply(
    link: Link,
    node: int,
    chunks: list[bytes],
    indices: list[int],
    message_body: bytes = b"",
    withhold: int = 0,
) -> str:
    """A reply a hostile site builds by hand: one Array over ``chunks``, listed by ``indices``."""
    envelope = message_to_proto(Message(RecordDict(), reply_to=link.sent[node]))
    metadata = envelope.metadata
    body = message_body or ProtoMessage(metadata=metadata).SerializeToString(deterministic=True)
    tree, contents = crafted_message(chunks, indices, message_body=body)
    metadata.message_id = tree.object_id
    return push_reply(link, node, envelope, tree, contents, withhold)


def assert_refused(reply: Message, link: Link, node: int, words: str) -> None:
    assert reply.has_error()
    assert reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert words in (reply.error.reason or "")
    # The round attributes the refusal to the node whose task it answers.
    assert reply.metadata.reply_to_message_id == link.sent[node].metadata.message_id


def update_content(payload: bytes) -> RecordDict:
    return RecordDict(
        {
            "update": ArrayRecord({"payload": Array(np.frombuffer(payload, dtype=np.uint8))}),
            "claims": ConfigRecord({"site": "site-a", "signature": b"\x01" * 64}),
            "metrics": MetricRecord({"num_examples": 120, "loss": 0.5}),
        }
    )


def test_limits_follow_max_update_bytes() -> None:
    limits = ReplyLimits.for_updates(256 * MIB)

    assert limits.max_bytes == 272 * MIB
    assert limits.max_objects == 1024 + 256


def test_an_amplified_array_is_refused_before_it_is_inflated(link: Link) -> None:
    send_tasks(link)
    node = link.nodes[0]
    message_id = crafted_reply(link, node, [b"\0" * MIB], [0] * 2000)  # 2000 MiB inflated

    tracemalloc.start()
    try:
        (reply,) = list(link.grid.pull_messages([link.sent[node].metadata.message_id]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert_refused(reply, link, node, "would inflate to more than")
    assert peak < 100 * MIB
    assert link.store.get(message_id) is None  # confirmed: the SuperLink freed its objects


def test_a_tree_listing_too_many_objects_is_refused_before_any_pull(link: Link) -> None:
    send_tasks(link)
    node = link.nodes[0]
    count = link.grid.limits.max_objects
    message_id = crafted_reply(link, node, [b"%d" % i for i in range(count)], list(range(count)))

    (reply,) = list(link.grid.pull_messages([link.sent[node].metadata.message_id]))

    assert_refused(reply, link, node, f"lists more than {count} objects")
    assert link.runtime.pulled_objects == []
    assert link.store.get(message_id) is None


def test_objects_past_the_byte_limit_stop_the_pull(link: Link) -> None:
    send_tasks(link)
    node = link.nodes[0]
    chunks = [bytes([i]) * (5 * MIB) for i in range(8)]  # 40 MiB stored, limit 26 MiB
    crafted_reply(link, node, chunks, list(range(8)))

    (reply,) = list(link.grid.pull_messages([link.sent[node].metadata.message_id]))

    assert_refused(reply, link, node, f"add up to more than {link.grid.limits.max_bytes} bytes")
    assert len(link.runtime.pulled_objects) < 4 + 8


HOSTILE = {
    "amplified": ([b"\0" * MIB], [0] * 2000, b"", "would inflate"),
    "index out of range": ([b"x" * 100], [0, 7], b"", "IndexError"),
    "malformed message": ([b"x" * 100], [0], b"\xff not a protobuf", "DecodeError"),
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_reply_leaves_the_others_of_its_pull_intact(link: Link, kind: str) -> None:
    send_tasks(link)
    hostile, honest = link.nodes
    chunks, indices, body, words = HOSTILE[kind]
    crafted_reply(link, hostile, chunks, indices, body)
    payload = np.random.default_rng(0).bytes(3 * MIB)
    honest_reply(link, honest, update_content(payload))

    replies = list(link.grid.pull_messages([m.metadata.message_id for m in link.sent.values()]))

    by_task = {r.metadata.reply_to_message_id: r for r in replies}
    assert len(by_task) == 2
    assert_refused(by_task[link.sent[hostile].metadata.message_id], link, hostile, words)
    good = by_task[link.sent[honest].metadata.message_id]
    assert not good.has_error()
    assert good.content.array_records["update"]["payload"].numpy().tobytes() == payload


def test_an_honest_update_passes_unchanged(link: Link) -> None:
    send_tasks(link)
    node = link.nodes[1]
    payload = np.random.default_rng(1).bytes(MAX_UPDATE - 1024)  # two 5 MiB chunks
    content = update_content(payload)
    message_id = honest_reply(link, node, content)

    (reply,) = list(link.grid.pull_messages([link.sent[node].metadata.message_id]))

    assert not reply.has_error()
    assert reply.metadata.message_id == message_id
    assert reply.metadata.src_node_id == node
    assert reply.content.array_records["update"]["payload"].numpy().tobytes() == payload
    assert dict(reply.content["claims"]) == dict(content["claims"])
    assert dict(reply.content["metrics"]) == dict(content["metrics"])
    assert link.store.get(message_id) is None


def test_objects_never_uploaded_fail_their_reply_at_the_deadline(link: Link) -> None:
    send_tasks(link)
    hostile, honest = link.nodes
    crafted_reply(link, hostile, [b"x" * 100, b"y" * 100], [0, 1], withhold=1)
    payload = np.random.default_rng(2).bytes(MIB)
    honest_reply(link, honest, update_content(payload))
    ids = [m.metadata.message_id for m in link.sent.values()]
    started = time.monotonic()

    replies = list(link.grid.pull_messages_by(ids, started + 1.0))

    # Flower alone would retry the missing object for up to two hours.
    assert time.monotonic() - started < 30
    by_task = {r.metadata.reply_to_message_id: r for r in replies}
    assert_refused(by_task[link.sent[hostile].metadata.message_id], link, hostile, "ObjectPull")
    good = by_task[link.sent[honest].metadata.message_id]
    assert good.content.array_records["update"]["payload"].numpy().tobytes() == payload


def test_a_reply_already_uploaded_is_taken_past_the_deadline(link: Link) -> None:
    send_tasks(link)
    node = link.nodes[0]
    payload = np.random.default_rng(3).bytes(MIB)
    honest_reply(link, node, update_content(payload))

    (reply,) = list(
        link.grid.pull_messages_by([link.sent[node].metadata.message_id], time.monotonic() - 5)
    )

    assert reply.content.array_records["update"]["payload"].numpy().tobytes() == payload


def test_rounds_pull_through_the_deadline_where_the_grid_offers_it(link: Link) -> None:
    asked: list[float] = []
    pull_by = link.grid.pull_messages_by

    def recording(message_ids: Iterable[str], deadline: float) -> Iterable[Message]:
        asked.append(deadline)
        return pull_by(message_ids, deadline)

    link.grid.pull_messages_by = recording  # type: ignore[method-assign]
    task = Message(RecordDict(), dst_node_id=link.nodes[1], message_type="train", group_id="2")
    started = time.monotonic()

    list(stream_replies(link.grid, [task], timeout=1.0))

    assert asked and all(started < deadline <= started + 1.5 for deadline in asked)
