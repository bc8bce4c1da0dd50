"""A deployed site pulls its task within its own limits: the coordinator's checks, site side."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.common.serde import context_to_proto, fab_to_proto, run_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.message_pb2 import ObjectTree, PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsilo.client.policy import TaskRefusedError
from fedsilo.deploy.site_pull import pull_task_input_bounded

from .crafted_objects import crafted_message

MIB = 1024 * 1024


class FakeRuntime:
    """The SuperNode's Runtime API as the site worker sees it, serving one task."""

    def __init__(self, tree: ObjectTree, contents: dict[str, bytes]) -> None:
        self.tree, self.contents = tree, contents
        self.pulled: list[str] = []
        self.confirmed: list[str] = []

    def PullTaskInput(self, request: Any) -> PullTaskInputResponse:  # noqa: N802
        context = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
        return PullTaskInputResponse(
            task_id=1,
            run=run_to_proto(Run.create_empty(7)),
            context=context_to_proto(context),
            fab=fab_to_proto(Fab(hash_str="0" * 64, content=b"", verifications={})),
        )

    def PullMessages(self, request: Any) -> PullAppMessagesResponse:  # noqa: N802
        # The envelope is not read: the message is inflated from the tree's objects.
        return PullAppMessagesResponse(
            messages_list=[ProtoMessage()], message_object_trees=[self.tree]
        )

    def PullObject(self, request: Any) -> PullObjectResponse:  # noqa: N802
        self.pulled.append(request.object_id)
        content = self.contents[request.object_id]
        return PullObjectResponse(object_found=True, object_available=True, object_content=content)

    def ConfirmMessageReceived(self, request: Any) -> None:  # noqa: N802
        self.confirmed.append(request.message_object_id)


@pytest.fixture(autouse=True)
def _as_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps a message with the running task's identity, which a test must set."""
    for name, value in (("_run_id", 7), ("_node_id", 3), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _honest(payload: bytes) -> FakeRuntime:
    content = RecordDict({"global": ArrayRecord({"a": Array(np.frombuffer(payload, np.uint8))})})
    message = Message(content, dst_node_id=3, message_type="train")
    objects = get_all_nested_objects(message)
    return FakeRuntime(
        get_object_tree(message), {oid: obj.deflate() for oid, obj in objects.items()}
    )


def _amplified(chunk: bytes, repeats: int) -> FakeRuntime:
    """A task a hostile coordinator builds by hand: one chunk listed ``repeats`` times."""
    tree, contents = crafted_message([chunk], [0] * repeats, array_key="a", record_key="global")
    return FakeRuntime(tree, contents)


def test_a_task_within_the_limit_arrives_as_flower_would_give_it() -> None:
    runtime = _honest(b"\x01" * 1000)

    message, context, run, _ = pull_task_input_bounded(
        runtime,  # type: ignore[arg-type]
        site="st-mary",
        max_payload_bytes=MIB,
    )

    assert message.content.array_records["global"]["a"].numpy().tobytes() == b"\x01" * 1000
    assert message.metadata.message_id == runtime.tree.object_id
    assert (context.node_id, run.run_id) == (3, 7)
    assert runtime.confirmed == [runtime.tree.object_id]


def test_an_amplified_array_is_refused_before_it_is_inflated() -> None:
    runtime = _amplified(b"\0" * MIB, repeats=2000)  # 2000 MiB once inflated

    tracemalloc.start()
    try:
        with pytest.raises(
            TaskRefusedError, match=r"st-mary: .*max_payload_bytes=1048576.*inflate"
        ):
            pull_task_input_bounded(
                runtime,  # type: ignore[arg-type]
                site="st-mary",
                max_payload_bytes=MIB,
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 100 * MIB
    assert runtime.confirmed == [runtime.tree.object_id]  # the SuperNode frees its objects
