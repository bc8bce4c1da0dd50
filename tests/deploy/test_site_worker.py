"""The site worker's gate: bundle allowlist, message size and adapter rank, before the app runs.

The worker is driven with real train messages built by the server's own code, on the tiny
model; only the Runtime API transport is left out (the end-to-end tests cover it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedsilo.client.app import build_client_app
from fedsilo.client.he import HE_STATE_KEY
from fedsilo.client.policy import PolicyError, TaskRefusedError
from fedsilo.client.secagg import OPENED_KEY
from fedsilo.client.secagg import STATE_KEY as SECAGG_STATE_KEY
from fedsilo.crypto import init_site_keys
from fedsilo.deploy.bundle import build_bundle, bundle_hash, expected_bundle_hash
from fedsilo.deploy.site import load_site_policy
from fedsilo.deploy.site_model import DeployedSite, load_identity
from fedsilo.deploy.site_worker import SiteWorker
from fedsilo.model.adapters import attach_lora, get_adapter_state
from fedsilo.model.base import base_model_hash, load_base_model
from fedsilo.privacy.he.ckks import HeError
from fedsilo.privacy.secagg.messages import SecAggMessageError
from fedsilo.privacy.secagg.site import SecAggRefusedError
from fedsilo.protocol.records import (
    PAYLOAD_ARRAY,
    TRAIN_MESSAGE,
    TRAIN_STAGE,
    UPDATE_KEY,
    LoraSpec,
    ProtocolError,
    RoundTask,
    adapter_to_record,
    train_instruction,
)
from fedsilo.training.compilation import is_prepared, machine_compile

OTHER_BUNDLE = "sha256:" + "ab" * 32


def _policy_file(folder: Path, tiny_model_dir: Path, **sections: dict[str, Any]) -> Path:
    keys = folder / "keys"
    init_site_keys("alpha", keys, passphrase=None)
    init_site_keys("coordinator-signing", keys, passphrase=None)
    (folder / "records.jsonl").write_text(
        '{"prompt": "Fever", "response": "R50.9"}\n{"prompt": "Cough", "response": "R05"}\n'
    )
    policy: dict[str, Any] = {
        "accept": {"federation_id": "pilot"},
        "limits": {"lora_rank": [1, 8]},
        "site": {
            "name": "alpha",
            "data": "records.jsonl",
            "base_model": str(tiny_model_dir),
            "keys_dir": "keys",
        },
        "connect": {
            "coordinator": "127.0.0.1:9443",
            "ca_cert": "keys/ca.pem",
            "coordinator_key": "keys/coordinator-signing.pub",
        },
    }
    for name, values in sections.items():
        policy.setdefault(name, {}).update(values)
    path = folder / "policy.toml"
    path.write_text(tomli_w.dumps(policy))
    return path


def _worker(path: Path) -> SiteWorker:
    policy = load_site_policy(path)
    site = DeployedSite(policy, load_identity(policy))
    return SiteWorker(
        site, build_client_app(site), runtime_address="127.0.0.1:1", stop=threading.Event()
    )


def _train_message(tiny_model_dir: Path, *, rank: int = 4) -> Message:
    base, _ = load_base_model(tiny_model_dir)
    targets = ("q_proj", "v_proj")
    model = attach_lora(
        base, rank=rank, alpha=8.0, dropout=0.0, target_modules=targets, init_seed=0
    )
    task = RoundTask(
        federation_id="pilot",
        run_id="run-1",
        stage=TRAIN_STAGE,
        run_name="t",
        round=1,
        cohort_size=3,
        base_model_hash=base_model_hash(tiny_model_dir),
        local_steps=1,
        batch_size=2,
        learning_rate=0.01,
        max_length=64,
        max_grad_norm=1.0,
        proximal_mu=0.0,
        seed=1,
    )
    lora = LoraSpec(rank=rank, alpha=8.0, dropout=0.0, target_modules=targets)
    content = train_instruction(adapter_to_record(get_adapter_state(model)), task, None, lora)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 0
    message = Message(content, 5, TRAIN_MESSAGE, group_id="1")
    message.metadata.__dict__["_message_id"] = "m-1"
    return message


def _context() -> Context:
    return Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})


def test_a_run_with_an_unapproved_bundle_is_refused_before_anything_is_loaded(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    worker = _worker(_policy_file(tmp_path, tiny_model_dir, code={"bundles": [OTHER_BUNDLE]}))

    reply = worker._answer(
        _train_message(tiny_model_dir), _context(), bundle_sha256=bundle_hash(build_bundle())
    )

    assert reply.has_error()
    assert "does not allow" in reply.error.reason
    assert worker.site._site is None  # no adapter was attached, no data encoded


def test_the_approved_bundle_trains_with_the_installed_app(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    pinned = expected_bundle_hash()
    worker = _worker(_policy_file(tmp_path, tiny_model_dir, code={"bundles": [pinned]}))

    reply = worker._answer(_train_message(tiny_model_dir), _context(), bundle_sha256=pinned)

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert PAYLOAD_ARRAY in reply.content.array_records[UPDATE_KEY]


def test_the_model_stays_loaded_across_rounds(tmp_path: Path, tiny_model_dir: Path) -> None:
    worker = _worker(_policy_file(tmp_path, tiny_model_dir))
    bundle = expected_bundle_hash()

    worker._answer(_train_message(tiny_model_dir), _context(), bundle_sha256=bundle)
    first = worker.site._site
    worker._answer(_train_message(tiny_model_dir), _context(), bundle_sha256=bundle)

    assert first is not None and worker.site._site is not None
    assert worker.site._site.model is first.model  # same object: no reload


def test_a_site_keeps_only_the_encoding_of_the_length_asked_last(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    worker = _worker(_policy_file(tmp_path, tiny_model_dir))
    lora = LoraSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))

    lengths = []
    for max_length in (12, 64, 12):
        worker.site.prepare(lora, max_length=max_length)
        site = worker.site.site_for(_context())
        lengths.append(max(len(example.input_ids) for example in site.examples))

    assert lengths[0] <= 12 < lengths[1] <= 64 and lengths[2] <= 12
    # One encoding held at a time: a coordinator cycling through lengths cannot make the site
    # keep a copy of its records per length.
    assert worker.site._encoded is not None and worker.site._encoded[0] == 12


def test_a_rank_outside_the_policy_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    worker = _worker(_policy_file(tmp_path, tiny_model_dir))

    reply = worker._answer(
        _train_message(tiny_model_dir, rank=16), _context(), bundle_sha256=expected_bundle_hash()
    )

    assert reply.has_error() and "lora_rank=16" in reply.error.reason


def test_an_oversized_message_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    worker = _worker(_policy_file(tmp_path, tiny_model_dir, limits={"max_payload_bytes": 1000}))

    reply = worker._answer(
        _train_message(tiny_model_dir), _context(), bundle_sha256=expected_bundle_hash()
    )

    assert reply.has_error() and "at most 1000" in reply.error.reason


def _as_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps a message with the running task's identity, which a test must set."""
    for name, value in (("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_bytes_relayed_in_config_records_count_towards_the_payload_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.app import ConfigRecord

    from fedsilo.deploy.site_worker import message_bytes

    _as_task(monkeypatch)
    relayed = ConfigRecord({"sealed": [b"x" * 4000, b"y" * 4000], "site": "st-mary", "n": 3})
    message = Message(RecordDict({"shares": relayed}), dst_node_id=1, message_type="query")

    assert message_bytes(message) == 8000 + len("st-mary") + 8


def test_numbers_in_metric_records_count_towards_the_payload_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.app import MetricRecord

    from fedsilo.deploy.site_worker import message_bytes

    _as_task(monkeypatch)
    listed = MetricRecord({"values": [0.5] * 1000, "count": 3})
    message = Message(RecordDict({"metrics": listed}), dst_node_id=1, message_type="query")

    assert message_bytes(message) == 8 * 1000 + 8


def test_the_bundle_hash_is_stable_and_carries_no_code() -> None:
    import io
    import zipfile

    first, second = build_bundle(), build_bundle()

    assert first == second
    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert not [n for n in names if n.endswith(".py")], names


def test_a_deployed_policy_needs_site_and_connect(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[accept]\nfederation_id = "pilot"\n')

    with pytest.raises(PolicyError, match=r"\['site', 'connect'\]"):
        load_site_policy(path)


def test_bundle_pins_must_be_sha256(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = _policy_file(tmp_path, tiny_model_dir, code={"bundles": ["md5:abc"]})

    with pytest.raises(PolicyError, match=r"code: .*bundles: .md5:abc. is not"):
        load_site_policy(path)


def _query_message() -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 0
    message = Message(RecordDict(), 5, "query.receipt", group_id="1")
    message.metadata.__dict__["_message_id"] = "m-2"
    return message


def _raising(error: Exception) -> Callable[..., Message]:
    def app(**_: object) -> Message:
        raise error

    return app


def test_an_unexpected_failure_reaches_the_coordinator_as_its_type_only(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker = _worker(_policy_file(tmp_path, tiny_model_dir))
    secret = "/data/st-mary/records.jsonl holds 1234 records"
    worker.app = _raising(RuntimeError(secret))  # type: ignore[assignment]

    with caplog.at_level("WARNING"):
        reply = worker._answer(_query_message(), _context(), bundle_sha256=expected_bundle_hash())

    assert reply.error.reason == "RuntimeError (details in the site's log)"
    assert secret in caplog.text


@pytest.mark.parametrize(
    "error",
    [
        TaskRefusedError("site alpha: the policy refuses"),
        ProtocolError("the train message carries no round task"),
        SecAggRefusedError("site alpha: already opened session f/r/1/1"),
        SecAggMessageError("key advertisement of beta: not canonical JSON"),
        HeError("ciphertext 0 cannot be added"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_deliberate_refusal_reaches_the_coordinator_with_its_reason(
    tmp_path: Path, tiny_model_dir: Path, error: Exception
) -> None:
    worker = _worker(_policy_file(tmp_path, tiny_model_dir))
    worker.app = _raising(error)  # type: ignore[assignment]

    reply = worker._answer(_query_message(), _context(), bundle_sha256=expected_bundle_hash())

    assert reply.error.reason == f"{type(error).__name__}: {error}"


@pytest.mark.parametrize("setting", ["off", "auto"])
def test_the_site_policy_decides_whether_its_training_compiles(
    tmp_path: Path, tiny_model_dir: Path, setting: str
) -> None:
    worker = _worker(_policy_file(tmp_path, tiny_model_dir, site={"compile": setting}))
    lora = LoraSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))

    worker.site.prepare(lora, max_length=32)
    site = worker.site.site_for(_context())

    # "auto" compiles where this machine's probe compilation works (it needs a C++ compiler).
    expected = setting == "auto" and machine_compile("auto").enabled
    assert is_prepared(site.model) is expected


def _keeping_state(seen: list[dict[str, object]]) -> Callable[..., Message]:
    """An app that records the session state it finds and leaves a new one behind."""

    def app(*, message: Message, context: Context) -> Message:
        records = context.state.config_records
        seen.append({key: dict(records[key]) for key in records})
        records[SECAGG_STATE_KEY] = ConfigRecord({"state": f"keys {len(seen)}".encode()})
        records[HE_STATE_KEY] = ConfigRecord({"secret": b"ckks"})
        records[OPENED_KEY] = ConfigRecord({"sessions": ["f/r/1/1"]})
        return Message(RecordDict(), reply_to=message)

    return app


def _keeping_state_worker(
    tmp_path: Path, tiny_model_dir: Path
) -> tuple[SiteWorker, list[dict[str, object]]]:
    """A worker whose app is :func:`_keeping_state`, and the list of states it saw."""
    worker = _worker(_policy_file(tmp_path, tiny_model_dir))
    seen: list[dict[str, object]] = []
    worker.app = _keeping_state(seen)  # type: ignore[assignment]
    return worker, seen


def _ask(worker: SiteWorker, context: Context) -> Message:
    """A query task answered by ``worker`` in ``context``."""
    return worker._answer(_query_message(), context, bundle_sha256=expected_bundle_hash())


def test_session_secrets_stay_in_the_worker_and_never_reach_the_supernode(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    worker, seen = _keeping_state_worker(tmp_path, tiny_model_dir)
    first = _context()

    _ask(worker, first)

    # What goes back to the SuperNode: no secret, the list of opened sessions as before.
    assert set(first.state.config_records) == {OPENED_KEY}
    # The SuperNode's next context, with a session planted by whoever else took a task from
    # its Runtime API: the app sees the worker's own secrets instead.
    second = _context()
    second.state.config_records[OPENED_KEY] = first.state.config_records[OPENED_KEY]
    second.state.config_records[SECAGG_STATE_KEY] = ConfigRecord({"state": b"planted"})
    _ask(worker, second)

    assert seen[1][SECAGG_STATE_KEY] == {"state": b"keys 1"}
    assert seen[1][HE_STATE_KEY] == {"secret": b"ckks"}
    assert set(second.state.config_records) == {OPENED_KEY}
    # Another Flower run starts without them.
    other_run = Context(run_id=2, node_id=5, node_config={}, state=RecordDict(), run_config={})
    _ask(worker, other_run)
    assert seen[2] == {}


def test_session_secrets_are_taken_back_when_the_app_fails(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    worker, seen = _keeping_state_worker(tmp_path, tiny_model_dir)
    _ask(worker, _context())

    def failing(*, message: Message, context: Context) -> Message:
        assert SECAGG_STATE_KEY in context.state.config_records
        raise SecAggRefusedError("site alpha: refused")

    worker.app = failing  # type: ignore[assignment]
    context = _context()
    reply = _ask(worker, context)

    assert reply.has_error()
    assert SECAGG_STATE_KEY not in context.state.config_records
    worker.app = _keeping_state(seen)  # type: ignore[assignment]
    _ask(worker, _context())
    assert seen[-1][SECAGG_STATE_KEY] == {"state": b"keys 1"}
