"""A deployed site's task, pulled within the site's own payload limit.

Flower's ``pull_task_input`` pulls every object the task's object tree lists and inflates the
message before the site sees a byte of it. The tree is the coordinator's declaration, and an
Array lists its chunks by index with repeats allowed, so a small upload can inflate to
gigabytes and end ``fedsilo site start`` for lack of memory. :func:`pull_task_input_bounded`
is Flower's function with the coordinator's own reply checks (:mod:`fedsilo.deploy.bounded_grid`)
applied to the task, with limits from the policy's ``max_payload_bytes``: the object count
before anything is pulled, the pulled bytes while pulling, the Arrays' inflated size before
inflating. The worker checks the inflated message against ``max_payload_bytes`` itself.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, pull_objects
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity

from fedsilo.client.policy import TaskRefusedError
from fedsilo.deploy.bounded_grid import (
    ReplyLimits,
    ReplyRefusedError,
    check_inflated_size,
    counting_pull,
    listed_object_ids,
)


def pull_task_input_bounded(
    client: RuntimeHttpClient, *, site: str, max_payload_bytes: int
) -> tuple[Message, Context, Run, Fab]:
    """The task, its context, run and app bundle, as Flower's ``pull_task_input`` returns them.

    Raises TaskRefusedError naming the limit a task breaks (its objects are confirmed received
    all the same, so that the SuperNode frees them).
    """
    response = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = response.task_id
    TaskIdentity.run_id = response.run.run_id
    TaskIdentity.node_id = response.context.node_id
    context = context_from_proto(response.context)
    run, fab = run_from_proto(response.run), fab_from_proto(response.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    limits = ReplyLimits.for_updates(max_payload_bytes)
    confirm = make_confirm_message_received_fn_protobuf(
        client.ConfirmMessageReceived, node, context.run_id
    )
    try:
        object_ids = listed_object_ids(tree, limits)
        pull = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)
        contents = pull_objects(object_ids, counting_pull(pull, max_bytes=limits.max_bytes))
        check_inflated_size(contents, limits)
    except ReplyRefusedError as error:
        confirm(tree.object_id)
        raise TaskRefusedError(
            f"site {site}: the task breaks the policy's max_payload_bytes={max_payload_bytes}: "
            f"{error}"
        ) from None
    confirm(tree.object_id)
    message = inflate_object_from_contents(tree.object_id, contents, keep_object_contents=False)
    if not isinstance(message, Message):
        raise TaskRefusedError(f"site {site}: the task's root object is a {type(message).__name__}")
    # The deflated message does not hold its own id (its object id).
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab
