"""Forged, replayed, duplicated, oversized and malformed updates are rejected and ledgered.

Each test makes site 0 (the first to answer) misbehave and checks that the round goes on with
the honest sites, that the reason names the problem, and that the ledger records it.
"""

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedsilo.client.app import handle_train
from fedsilo.config import FedsiloConfig
from fedsilo.crypto import UpdateBinding, generate_private_key, sha256_hex, sign_update
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.protocol.records import (
    SITE_KEY,
    UPDATE_KEY,
    binding_from_record,
    binding_to_record,
    payload_from_record,
    payload_to_record,
)
from fedsilo.server.federation import FederationError
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.sites import SimulatedSites

from .conftest import run_with_grid

Tamper = Callable[[Message, Context, SimulatedSites], Message]


def misbehaving(tamper: Tamper, *, node_index: int = 0) -> Callable[[SimulatedSites], ClientApp]:
    """A ClientApp whose site ``node_index`` passes its honest reply through ``tamper``."""

    def make_app(sites: SimulatedSites) -> ClientApp:
        app = ClientApp()

        @app.train()
        def train(message: Message, context: Context) -> Message:
            reply = handle_train(message, context, sites)
            if context.node_config["partition-id"] == node_index:
                reply = tamper(reply, context, sites)
            return reply

        return app

    return make_app


def _payload(reply: Message) -> bytes:
    return payload_from_record(reply.content.array_records[UPDATE_KEY], max_bytes=1 << 30, what="")


def _replace(reply: Message, *, payload: bytes, binding: UpdateBinding, signature: bytes) -> None:
    reply.content.array_records[UPDATE_KEY] = payload_to_record(payload)
    reply.content.config_records[SITE_KEY] = binding_to_record(binding, signature)


def _run_one_round(config: FedsiloConfig, run_dir: Path, tamper: Tamper) -> dict[str, str]:
    run_with_grid(config, run_dir, misbehaving(tamper))
    [_, round_one] = RunFolder(run_dir).read_metrics()
    assert round_one["sites_ok"] == 2
    return dict(round_one["failures"])


def _ledgered_senders(run_dir: Path) -> list[str]:
    return [
        str(entry.payload["sender"])
        for entry in read_entries(run_dir / "ledger.db")
        if entry.kind is EntryKind.UPDATE_REJECTED
    ]


def _ledgered_rejections(run_dir: Path) -> list[str]:
    return [
        str(entry.payload["reason"])
        for entry in read_entries(run_dir / "ledger.db")
        if entry.kind is EntryKind.UPDATE_REJECTED
    ]


def test_update_signed_by_a_stranger_is_rejected(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    def forge(reply: Message, context: Context, sites: SimulatedSites) -> Message:
        binding, _ = binding_from_record(reply.content.config_records[SITE_KEY])
        stranger = generate_private_key()
        _replace(
            reply,
            payload=_payload(reply),
            binding=binding,
            signature=sign_update(stranger, binding),
        )
        return reply

    failures = _run_one_round(make_config(run={"rounds": 1}), tmp_path / "run", forge)

    [(sender, reason)] = failures.items()
    assert "bad signature" in reason
    assert sender.startswith("node-")
    assert _ledgered_rejections(tmp_path / "run") == [reason]


def test_site_cannot_impersonate_another_site(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    victims: list[str] = []

    def impersonate(reply: Message, context: Context, sites: SimulatedSites) -> Message:
        binding, _ = binding_from_record(reply.content.config_records[SITE_KEY])
        other = sites._task.sites[1].name
        victims.append(other)
        claimed = replace(binding, site_id=other)
        own_key = sites.site_for(context).signing_key
        _replace(
            reply, payload=_payload(reply), binding=claimed, signature=sign_update(own_key, claimed)
        )
        return reply

    failures = _run_one_round(make_config(run={"rounds": 1}), tmp_path / "run", impersonate)

    # The rejection is ledgered under the node that sent it, never under the claimed victim.
    [(sender, reason)] = failures.items()
    [victim] = set(victims)
    assert "bad signature" in reason and repr(victim) in reason
    assert sender.startswith("node-") and victim not in sender
    assert _ledgered_senders(tmp_path / "run") == [sender]


def test_unknown_site_is_rejected(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    def stranger_site(reply: Message, context: Context, sites: SimulatedSites) -> Message:
        binding, _ = binding_from_record(reply.content.config_records[SITE_KEY])
        claimed = replace(binding, site_id="mallory")
        key = generate_private_key()
        _replace(
            reply, payload=_payload(reply), binding=claimed, signature=sign_update(key, claimed)
        )
        return reply

    failures = _run_one_round(make_config(run={"rounds": 1}), tmp_path / "run", stranger_site)

    [(sender, reason)] = failures.items()
    assert sender.startswith("node-")
    assert reason == "site 'mallory' is not enrolled in this federation"


def test_replayed_update_from_an_earlier_round_is_rejected(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    captured: list[Message] = []

    def replay(reply: Message, context: Context, sites: SimulatedSites) -> Message:
        if not captured:
            captured.append(reply)
            return reply
        stale = captured[0]
        _replace(
            reply,
            payload=_payload(stale),
            binding=binding_from_record(stale.content.config_records[SITE_KEY])[0],
            signature=binding_from_record(stale.content.config_records[SITE_KEY])[1],
        )
        return reply

    run_with_grid(make_config(run={"rounds": 2}), tmp_path / "run", misbehaving(replay))

    [_, round_one, round_two] = RunFolder(tmp_path / "run").read_metrics()
    assert round_one["sites_ok"] == 3
    assert round_two["sites_ok"] == 2
    [reason] = round_two["failures"].values()
    assert "replayed or stale update: signed for" in reason
    assert "round 1" in reason and "round 2" in reason


def test_second_copy_of_an_update_is_a_duplicate(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    first: list[Message] = []

    def copy_first(reply: Message, context: Context, sites: SimulatedSites) -> Message:
        if context.node_config["partition-id"] == 0:
            first.append(reply)
            return reply
        source = first[-1]
        binding, signature = binding_from_record(source.content.config_records[SITE_KEY])
        _replace(reply, payload=_payload(source), binding=binding, signature=signature)
        return reply

    def make_app(sites: SimulatedSites) -> ClientApp:
        app = ClientApp()

        @app.train()
        def train(message: Message, context: Context) -> Message:
            reply = handle_train(message, context, sites)
            if context.node_config["partition-id"] in (0, 1):
                reply = copy_first(reply, context, sites)
            return reply

        return app

    run_with_grid(make_config(run={"rounds": 1}), tmp_path / "run", make_app)

    [_, round_one] = RunFolder(tmp_path / "run").read_metrics()
    assert round_one["sites_ok"] == 2
    [reason] = round_one["failures"].values()
    assert reason.startswith("duplicate: an update from")


def test_payload_changed_after_signing_is_rejected(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    def flip_a_byte(reply: Message, context: Context, sites: SimulatedSites) -> Message:
        payload = bytearray(_payload(reply))
        payload[-1] ^= 0x01
        binding, signature = binding_from_record(reply.content.config_records[SITE_KEY])
        _replace(reply, payload=bytes(payload), binding=binding, signature=signature)
        return reply

    failures = _run_one_round(make_config(run={"rounds": 1}), tmp_path / "run", flip_a_byte)

    [reason] = failures.values()
    assert reason == "the payload's sha256 differs from the signed digest"


def _resigned(reply: Message, context: Context, sites: SimulatedSites, payload: bytes) -> Message:
    """What a malicious but enrolled site does: sign its own bad payload properly."""
    binding, _ = binding_from_record(reply.content.config_records[SITE_KEY])
    binding = replace(binding, payload_sha256=sha256_hex(payload))
    key = sites.site_for(context).signing_key
    _replace(reply, payload=payload, binding=binding, signature=sign_update(key, binding))
    return reply


def test_signed_update_with_nan_is_rejected(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    def poison(reply: Message, context: Context, sites: SimulatedSites) -> Message:
        tensors = load_safetensors(_payload(reply))
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        return _resigned(reply, context, sites, save_safetensors(tensors))

    failures = _run_one_round(make_config(run={"rounds": 1}), tmp_path / "run", poison)

    [reason] = failures.values()
    assert "NaN" in reason


def test_signed_update_with_wrong_shape_is_rejected(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    def reshape(reply: Message, context: Context, sites: SimulatedSites) -> Message:
        tensors = load_safetensors(_payload(reply))
        first = sorted(tensors)[0]
        tensors[first] = torch.zeros(tensors[first].shape[0] + 1, tensors[first].shape[1])
        return _resigned(reply, context, sites, save_safetensors(tensors))

    failures = _run_one_round(make_config(run={"rounds": 1}), tmp_path / "run", reshape)

    [reason] = failures.values()
    assert "has shape" in reason


def test_garbage_payload_is_rejected(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    def garbage(reply: Message, context: Context, sites: SimulatedSites) -> Message:
        return _resigned(reply, context, sites, b"\x00" * 64)

    failures = _run_one_round(make_config(run={"rounds": 1}), tmp_path / "run", garbage)

    [reason] = failures.values()
    assert "not a valid safetensors adapter" in reason


def test_oversized_updates_are_rejected_before_parsing(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(
        run={"rounds": 1},
        federation={"max_update_bytes": 1000},
        strategy={"max_round_attempts": 1},
    )

    with pytest.raises(FederationError):
        run_with_grid(config, tmp_path / "run")

    reasons = _ledgered_rejections(tmp_path / "run")
    assert len(reasons) == 3
    assert all("exceeds the maximum of 1000" in reason for reason in reasons)
    kinds = [entry.kind for entry in read_entries(tmp_path / "run" / "ledger.db")]
    assert kinds[-1] is EntryKind.ROUND_FAILED


def test_every_accepted_site_keeps_a_verified_receipt(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    run_with_grid(make_config(run={"rounds": 2}), tmp_path / "run")

    receipts = sorted(p.name for p in (tmp_path / "run" / "sites").glob("*/receipts/*/*.json"))
    assert len(receipts) == 6
    assert np.unique([p.split("-")[1] for p in receipts]).tolist() == ["1", "2"]
