"""Replies that used to end a run: each is now one site's ledgered rejection, and the round goes on.

One federation of nine sites runs one round over the in-process grid (the real ServerApp and
ClientApp); sites 0-6 each misbehave in one way, sites 7 and 8 are honest. Each test checks one
misbehaviour: its rejection is in the round's failures and in the ledger, with a one-line
reason, and the honest sites' updates are the ones aggregated.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedsilo.client.app import handle_train
from fedsilo.config import parse_config
from fedsilo.crypto import generate_private_key, sign_update
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.protocol.records import (
    METRICS_KEY,
    PAYLOAD_ARRAY,
    SITE_KEY,
    UPDATE_KEY,
    binding_from_record,
    binding_to_record,
)
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.sites import SimulatedSites

from .conftest import run_with_grid

MAX_UPDATE_BYTES = 4 * 1024 * 1024


def _npy(array: np.ndarray, *, pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=pickle)
    return buffer.getvalue()


def _terabyte_header() -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": (2**40,)}
    )
    return buffer.getvalue() + b"\x00" * 64


def _set_update(reply: Message, data: bytes, *, shape: tuple[int, ...], stype: str) -> None:
    array = Array(dtype="uint8", shape=shape, stype=stype, data=data)
    reply.content.array_records[UPDATE_KEY] = ArrayRecord({PAYLOAD_ARRAY: array})


def wrong_serialization(reply: Message) -> None:
    honest = reply.content.array_records[UPDATE_KEY][PAYLOAD_ARRAY]
    _set_update(reply, honest.data, shape=honest.shape, stype="torch.Tensor")


def not_numpy(reply: Message) -> None:
    _set_update(reply, b"\x80\x04 not a numpy array " * 10, shape=(210,), stype="numpy.ndarray")


def object_array(reply: Message) -> None:
    data = _npy(np.array([1, "a", None], dtype=object), pickle=True)
    _set_update(reply, data, shape=(len(data),), stype="numpy.ndarray")


def terabyte_header(reply: Message) -> None:
    _set_update(reply, _terabyte_header(), shape=(64,), stype="numpy.ndarray")


def understated_shape(reply: Message) -> None:
    data = _npy(np.zeros(MAX_UPDATE_BYTES + 38_000, dtype=np.uint8))
    _set_update(reply, data, shape=(1,), stype="numpy.ndarray")


def stranger_signature(reply: Message) -> None:
    binding, _ = binding_from_record(reply.content.config_records[SITE_KEY])
    signature = sign_update(generate_private_key(), binding)
    reply.content.config_records[SITE_KEY] = binding_to_record(binding, signature)
    not_numpy(reply)


def huge_example_count(reply: Message) -> None:
    metrics = dict(reply.content.metric_records[METRICS_KEY])
    reply.content.metric_records[METRICS_KEY] = MetricRecord({**metrics, "num_examples": 2**62})


@dataclass(frozen=True)
class Misbehaviour:
    tamper: Callable[[Message], None]
    reason: str  # a fragment of the rejection's reason
    named_by_site: bool = True  # False: named by its node, as no signature of the site verified


MISBEHAVIOURS: dict[int, Misbehaviour] = {
    0: Misbehaviour(wrong_serialization, "serialization 'torch.Tensor' is not 'numpy.ndarray'"),
    1: Misbehaviour(not_numpy, "not a numpy array"),
    2: Misbehaviour(object_array, "has dtype object"),
    3: Misbehaviour(terabyte_header, "header declares shape (1099511627776,)"),
    4: Misbehaviour(understated_shape, "exceeds the maximum of 4194304", named_by_site=False),
    5: Misbehaviour(stranger_signature, "bad signature", named_by_site=False),
    6: Misbehaviour(huge_example_count, "num_examples must be between 1 and"),
}
HONEST = (7, 8)


@dataclass(frozen=True)
class RunOutcome:
    site_names: dict[int, str]
    round_one: dict[str, Any]
    rejections: dict[str, str]  # ledgered sender -> reason


@pytest.fixture(scope="module")
def outcome(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunOutcome:
    config = parse_config(
        {
            "run": {
                "name": "hostile",
                "seed": 0,
                "rounds": 1,
                "torch_threads": 1,
                "require_site_policies": False,
            },
            "model": {"base": str(tiny_model_dir)},
            "lora": {"rank": 4, "alpha": 8.0},
            "task": {
                "name": "icd10",
                "num_sites": 9,
                "examples_per_site": 4,
                "gold_size": 4,
                "system_prompt": "Code it.",
            },
            "train": {
                "local_steps": 1,
                "batch_size": 2,
                "learning_rate": 0.01,
                "max_length": 64,
                "compile": "off",
            },
            "strategy": {"min_sites": 2, "max_round_attempts": 1},
            "evaluation": {"max_new_tokens": 2, "batch_size": 8},
            "federation": {"max_update_bytes": MAX_UPDATE_BYTES},
        },
        source="test config",
    )
    names: dict[int, str] = {}

    def make_app(sites: SimulatedSites) -> ClientApp:
        app = ClientApp()

        @app.train()
        def train(message: Message, context: Context) -> Message:
            index = int(context.node_config["partition-id"])
            names[index] = sites.site_for(context).name
            reply = handle_train(message, context, sites)
            if index in MISBEHAVIOURS:
                MISBEHAVIOURS[index].tamper(reply)
            return reply

        return app

    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    run_with_grid(config, run_dir, make_app)  # completes: no exception escapes the round
    [_, round_one] = RunFolder(run_dir).read_metrics()
    rejections = {
        str(entry.payload["sender"]): str(entry.payload["reason"])
        for entry in read_entries(run_dir / "ledger.db")
        if entry.kind is EntryKind.UPDATE_REJECTED
    }
    return RunOutcome(names, round_one, rejections)


def test_the_honest_sites_updates_are_aggregated(outcome: RunOutcome) -> None:
    honest = sorted(outcome.site_names[i] for i in HONEST)

    assert outcome.round_one["sites"] == honest
    assert outcome.round_one["sites_failed"] == len(MISBEHAVIOURS)
    assert 0 < outcome.round_one["examples"] <= 2 * 4


@pytest.mark.parametrize(
    "index", sorted(MISBEHAVIOURS), ids=lambda i: MISBEHAVIOURS[i].tamper.__name__
)
def test_misbehaving_reply_is_a_ledgered_rejection(outcome: RunOutcome, index: int) -> None:
    misbehaviour = MISBEHAVIOURS[index]
    site = outcome.site_names[index]
    matches = {
        sender: reason
        for sender, reason in outcome.rejections.items()
        if misbehaviour.reason in reason
    }

    [(sender, reason)] = matches.items()
    assert site in sender if misbehaviour.named_by_site else sender.startswith("node-")
    assert "\n" not in reason and len(reason) < 400
    assert outcome.round_one["failures"][sender] == reason


def test_an_unanticipated_failure_rejects_only_that_reply(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of defence: an error no check foresaw is that reply's rejection."""
    from fedsilo.server import federation

    admit = federation.admit_update
    first: list[int] = []

    def admit_or_fail(reply: Message, **kwargs: Any) -> Any:
        if not first or first[0] == reply.metadata.src_node_id:
            first.append(reply.metadata.src_node_id)
            raise RecursionError("maximum recursion depth exceeded")
        return admit(reply, **kwargs)

    monkeypatch.setattr(federation, "admit_update", admit_or_fail)
    config = parse_config(
        {
            "run": {"rounds": 1, "require_site_policies": False},
            "model": {"base": str(tiny_model_dir)},
            "lora": {"rank": 4, "alpha": 8.0},
            "task": {"num_sites": 3, "examples_per_site": 4, "gold_size": 4},
            "train": {"local_steps": 1, "batch_size": 2, "max_length": 64, "compile": "off"},
            "evaluation": {"max_new_tokens": 2},
        },
        source="test config",
    )

    run_with_grid(config, tmp_path / "run")

    [_, round_one] = RunFolder(tmp_path / "run").read_metrics()
    assert round_one["sites_ok"] == 2
    [(sender, reason)] = round_one["failures"].items()
    assert sender == f"node-{first[0]}"
    assert reason == (
        f"the reply of node-{first[0]} could not be processed: "
        "RecursionError: maximum recursion depth exceeded"
    )
    ledgered = [
        entry.payload["reason"]
        for entry in read_entries(tmp_path / "run" / "ledger.db")
        if entry.kind is EntryKind.UPDATE_REJECTED
    ]
    assert ledgered == [reason]
