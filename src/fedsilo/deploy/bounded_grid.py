"""The deployed coordinator's grid: Flower's HttpGrid, each reply bounded before it costs much.

Flower's :class:`HttpGrid` pulls every object a reply's object tree lists, then inflates the
message, before fedsilo looks at it. The tree is the sending site's own declaration: the
SuperLink caps neither how many objects it lists nor their total size (nginx bounds only each
HTTP request), and an Array lists its chunks by index with repeats allowed, so a megabyte
uploaded can inflate to gigabytes. :class:`BoundedHttpGrid` checks each reply against
:class:`ReplyLimits`, derived from the federation's ``max_update_bytes``: the object count
before anything is pulled, the pulled bytes while pulling, the Arrays' inflated size before
inflating. A reply that breaks a limit, or is malformed in any way, comes back as an error
reply for its node alone; its objects are freed on the SuperLink all the same, and the other
replies of the same pull are untouched.

Replies are pulled and inflated one at a time, as the caller iterates, so a round that folds
each update before asking for the next holds one inflated reply, not one per site.

A reply's envelope reaches the SuperLink before its objects do, and a site may list objects it
never uploads. Flower would keep asking for them for up to two hours per reply; through
:meth:`BoundedHttpGrid.pull_messages_by` a reply's objects are waited for only until the
stage's deadline, after which the reply fails as its node's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import cast

import httpx
from flwr.app import Message, Metadata
from flwr.app.error import Error
from flwr.app.message import Array, make_message
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest, ObjectTree
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullAppMessagesResponse
from flwr.supercore.constant import HEAD_BODY_DIVIDER, PULL_MAX_TIME, SYSTEM_MESSAGE_TYPE
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import (
    get_object_body,
    get_object_head_values_from_object_content,
    iterate_object_tree,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, pull_objects
from flwr.supercore.run import Run
from flwr.superlink.grid import HttpGrid

from fedsilo.server.rounds import REPLY_POLL_S

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Beyond the update itself a reply carries a signature, claims, metrics and a DP event, a few
# kilobytes; nginx lets each request through with the same 16 MiB over max_update_bytes.
REPLY_SLACK_BYTES = 16 * MIB
# Flower cuts an Array into 5 MiB chunks (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, set per process);
# counting 1 MiB leaves room for a site that runs with smaller chunks.
SMALLEST_CHUNK_BYTES = 1 * MIB
# Objects that are not chunks: the message, its record dict, a dozen records and the arrays in
# them. A fedsilo reply has a few dozen; this is ample and still bounds the pulls to a number
# the coordinator serves in seconds.
OTHER_OBJECTS = 1024
# An Array's own content is its dtype, shape and chunk index list, a few bytes per index and
# one index per chunk. Checked before its JSON is parsed: a long list of repeated small
# indices would otherwise cost several times its size in Python objects.
ARRAY_HEAD_BYTES = 4096
ARRAY_BYTES_PER_INDEX = 16


class ReplyRefusedError(Exception):
    """A reply breaks the coordinator's limits or is malformed; says which limit or how."""


@dataclass(frozen=True)
class ReplyLimits:
    """What one reply may cost the coordinator to pull and inflate.

    ``max_bytes`` bounds the pulled object contents and, separately, the Arrays' data once
    inflated; ``max_objects`` bounds the objects its tree lists (each one is a request to the
    SuperLink); ``max_array_content`` bounds one Array's own content (its chunk index list).
    """

    max_bytes: int
    max_objects: int
    max_array_content: int

    @classmethod
    def for_updates(cls, max_update_bytes: int) -> ReplyLimits:
        """The limits for a federation whose updates are at most ``max_update_bytes``.

        max_bytes = max_update_bytes + 16 MiB, and
        max_objects = 1024 + ceil(max_update_bytes / 1 MiB): one object per chunk at the
        smallest chunk size allowed for, plus the message's other objects.
        """
        if max_update_bytes < 1:
            raise ValueError(f"max_update_bytes must be positive, got {max_update_bytes}")
        max_objects = OTHER_OBJECTS + -(-max_update_bytes // SMALLEST_CHUNK_BYTES)
        return cls(
            max_bytes=max_update_bytes + REPLY_SLACK_BYTES,
            max_objects=max_objects,
            max_array_content=ARRAY_HEAD_BYTES + ARRAY_BYTES_PER_INDEX * max_objects,
        )


def listed_object_ids(tree: ObjectTree, limits: ReplyLimits) -> list[str]:
    """The distinct object ids ``tree`` lists, refused when it lists more than ``max_objects``.

    Stops walking the tree one node past the limit, so an oversized tree costs no more.
    """
    walked = list(islice(iterate_object_tree(tree), limits.max_objects + 1))
    if len(walked) > limits.max_objects:
        raise ReplyRefusedError(f"its object tree lists more than {limits.max_objects} objects")
    return list(dict.fromkeys(node.object_id for node in walked))


def counting_pull(pull: Callable[[str], bytes], *, max_bytes: int) -> Callable[[str], bytes]:
    """``pull``, refusing once the contents it has returned add up to more than ``max_bytes``.

    Flower's ``pull_objects`` calls it from several threads, hence the lock; the refusal stops
    the remaining pulls.
    """
    lock = threading.Lock()
    total = 0

    def pull_counted(object_id: str) -> bytes:
        nonlocal total
        content = pull(object_id)
        with lock:
            total += len(content)
            over = total > max_bytes
        if over:
            raise ReplyRefusedError(f"its objects add up to more than {max_bytes} bytes")
        return content

    return pull_counted


def _body_length(content: bytes) -> int:
    return len(content) - content.index(HEAD_BODY_DIVIDER) - len(HEAD_BODY_DIVIDER)


def check_inflated_size(contents: Mapping[str, bytes], limits: ReplyLimits) -> None:
    """Refuse unless the Arrays in ``contents`` inflate to at most ``max_bytes`` together.

    Computed from the contents alone, before anything is inflated: Flower builds an Array's
    data by concatenating its chunks' bodies in the order of its index list, and an index may
    repeat, so its size is the sum of the bodies over that list. Each distinct Array counts
    once, as Flower inflates each object id once.
    """
    array_type = Array.__qualname__
    chunk_lengths: dict[str, int] = {}
    total = 0
    for content in contents.values():
        object_type, children, _ = get_object_head_values_from_object_content(content)
        if object_type != array_type:
            continue
        if len(content) > limits.max_array_content:
            raise ReplyRefusedError(
                f"an Array's chunk list is longer than {limits.max_array_content} bytes"
            )
        indices = json.loads(get_object_body(content, Array))["arraychunk_ids"]
        for index in indices:
            # The same lookup Flower's Array.inflate makes; a bad index fails here instead.
            chunk_id = children[index]
            if chunk_id not in chunk_lengths:
                if chunk_id not in contents:
                    raise ReplyRefusedError(f"an Array names chunk {chunk_id}, not in its tree")
                chunk_lengths[chunk_id] = _body_length(contents[chunk_id])
            total += chunk_lengths[chunk_id]
            if total > limits.max_bytes:
                raise ReplyRefusedError(
                    f"its arrays would inflate to more than {limits.max_bytes} bytes"
                )


class BoundedHttpGrid(HttpGrid):
    """Flower's HttpGrid whose ``pull_messages`` bounds, and isolates, each reply.

    ``pull_messages`` asks the SuperLink for the ready replies at once, as Flower does, and
    returns an iterator that pulls and inflates each reply only when it is reached. Iterate it
    once; ``send_and_receive`` here does so (Flower's iterates a pull twice).
    """

    def __init__(
        self,
        runtime_api_address: str,
        root_certificates: bytes | None = None,
        *,
        token: str,
        max_update_bytes: int,
        insecure: bool = False,
    ) -> None:
        super().__init__(runtime_api_address, insecure, root_certificates, token=token)
        self._limits = ReplyLimits.for_updates(max_update_bytes)

    @property
    def limits(self) -> ReplyLimits:
        return self._limits

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._pull(message_ids, deadline=None)

    def pull_messages_by(self, message_ids: Iterable[str], deadline: float) -> Iterable[Message]:
        """:meth:`pull_messages`, waiting for a reply's objects until ``deadline`` at most (a
        ``time.monotonic()`` value): past it, objects not yet uploaded fail their reply."""
        return self._pull(message_ids, deadline=deadline)

    def _pull(self, message_ids: Iterable[str], *, deadline: float | None) -> Iterable[Message]:
        run_id = cast(Run, self._run).run_id
        try:
            response = self._runtime_client.PullMessages(
                PullAppMessagesRequest(message_ids=list(message_ids))
            )
        except httpx.HTTPStatusError as error:
            if error.response.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE:
                log.error("the SuperLink's answer to a pull was too large; pull fewer at once")
                return []
            raise
        return self._receive_each(run_id, response, deadline)

    def _receive_each(
        self, run_id: int, response: PullAppMessagesResponse, deadline: float | None
    ) -> Iterator[Message]:
        pairs = zip(response.messages_list, response.message_object_trees, strict=True)
        for message_proto, tree in pairs:
            # Flower's own limit, or the time left: an object already uploaded is still pulled
            # at once past the deadline (the first try does not wait).
            max_time = None if deadline is None else max(0.0, deadline - time.monotonic())
            yield self._receive(run_id, message_proto, tree, max_time)

    def _receive(
        self, run_id: int, message_proto: ProtoMessage, tree: ObjectTree, max_time: float | None
    ) -> Message:
        message_id = message_proto.metadata.message_id
        reply_to = message_proto.metadata.reply_to_message_id
        try:
            return self._pull_and_inflate(run_id, message_id, reply_to, tree, max_time)
        except Exception as error:
            # Whatever this reply does wrong (a limit, a missing object, a malformed head, an
            # index out of range), it fails as this reply only; the round reads it as its
            # node's failure through reply_to.
            reason = f"reply refused by the coordinator: {type(error).__name__}: {error}"
            log.warning("reply %s to %s: %s", message_id, reply_to, reason)
            return self._refusal(run_id, reply_to, reason)
        finally:
            # Confirmed whether or not it was accepted, so the SuperLink frees its objects.
            self._confirm(run_id, message_id)

    def _pull_and_inflate(
        self,
        run_id: int,
        message_id: str,
        reply_to: str,
        tree: ObjectTree,
        max_time: float | None,
    ) -> Message:
        object_ids = listed_object_ids(tree, self._limits)
        pull = make_pull_object_fn_protobuf(
            pull_object_protobuf=self._runtime_client.PullObject, node=self.node, run_id=run_id
        )
        contents = pull_objects(
            object_ids,
            pull_object_fn=counting_pull(pull, max_bytes=self._limits.max_bytes),
            max_time=PULL_MAX_TIME if max_time is None else max_time,
        )
        check_inflated_size(contents, self._limits)
        message = inflate_object_from_contents(message_id, contents)
        if not isinstance(message, Message):
            raise ReplyRefusedError(f"its root object is a {type(message).__name__}")
        # The round matches a reply to its node by reply_to; the one inside the object must be
        # the one the SuperLink checked against the node that sent it.
        if message.metadata.reply_to_message_id != reply_to:
            raise ReplyRefusedError("its content answers another message than its envelope")
        message.metadata.__dict__["_message_id"] = message_id
        return message

    def _refusal(self, run_id: int, reply_to: str, reason: str) -> Message:
        metadata = Metadata(
            run_id=run_id,
            message_id="",
            src_node_id=self.node.node_id,
            dst_node_id=self.node.node_id,
            message_type=SYSTEM_MESSAGE_TYPE,
            group_id="",
            ttl=0,
            reply_to_message_id=reply_to,
            created_at=now().timestamp(),
        )
        return make_message(
            metadata=metadata, error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=reason)
        )

    def _confirm(self, run_id: int, message_id: str) -> None:
        try:
            self._runtime_client.ConfirmMessageReceived(
                ConfirmMessageReceivedRequest(
                    node=self.node, run_id=run_id, message_object_id=message_id
                )
            )
        except Exception as error:
            # Only storage is at stake: the SuperLink drops the run's objects when it ends.
            log.warning("could not confirm reply %s to the SuperLink: %s", message_id, error)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and collect their replies, polling every ``REPLY_POLL_S``."""
        pending = set(self.push_messages(messages))
        deadline = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending and (timeout is None or time.monotonic() < deadline):
            for reply in self._pull(list(pending), deadline=None if timeout is None else deadline):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            if pending:
                time.sleep(REPLY_POLL_S)
        return replies
