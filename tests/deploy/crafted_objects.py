"""Flower message objects built by hand, as a hostile party can: one Array over given chunks,
listed by an index list of its choosing (repeats allowed), in a RecordDict in a Message."""

from __future__ import annotations

import json
from hashlib import sha256

from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER


def flwr_object(kind: str, children: list[str], body: bytes) -> tuple[str, bytes]:
    """An object as Flower serialises one (head, divider, body), whatever its body says."""
    head = HEAD_VALUE_DIVIDER.join([kind, ",".join(children), str(len(body))])
    content = head.encode() + HEAD_BODY_DIVIDER + body
    return sha256(content).hexdigest(), content


def crafted_message(
    chunks: list[bytes],
    indices: list[int],
    *,
    message_body: bytes = b"",
    array_key: str = "payload",
    record_key: str = "update",
) -> tuple[ObjectTree, dict[str, bytes]]:
    """The object tree and contents of a Message whose RecordDict holds, under ``record_key``,
    an ArrayRecord holding, under ``array_key``, one Array over ``chunks`` listed by
    ``indices``."""
    contents: dict[str, bytes] = {}
    chunk_ids = []
    for data in chunks:
        chunk_id, contents[chunk_id] = flwr_object("ArrayChunk", [], data)
        chunk_ids.append(chunk_id)
    size = sum(len(chunks[i]) for i in indices if 0 <= i < len(chunks))
    array_meta = {"dtype": "uint8", "shape": [size], "stype": "numpy.ndarray"}
    array_body = json.dumps({**array_meta, "arraychunk_ids": indices}).encode()
    array_id, contents[array_id] = flwr_object("Array", chunk_ids, array_body)
    record_body = json.dumps({array_key: array_id}).encode()
    record_id, contents[record_id] = flwr_object("ArrayRecord", [array_id], record_body)
    dict_body = json.dumps({record_key: record_id}).encode()
    dict_id, contents[dict_id] = flwr_object("RecordDict", [record_id], dict_body)
    message_id, contents[message_id] = flwr_object("Message", [dict_id], message_body)
    array = ObjectTree(object_id=array_id, children=[ObjectTree(object_id=c) for c in chunk_ids])
    record = ObjectTree(object_id=record_id, children=[array])
    records = ObjectTree(object_id=dict_id, children=[record])
    return ObjectTree(object_id=message_id, children=[records]), contents
