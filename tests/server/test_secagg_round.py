"""Secure aggregation over the Grid: exact sums with dropouts at every stage, clean stops below
the threshold, refusals by sites, and a server that never holds one site's update in the clear.
"""

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from fedsilo.client.policy import SitePolicy, policy_digest
from fedsilo.crypto import agreement_public_bytes, generate_agreement_key
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.model.flatten import flatten
from fedsilo.privacy.secagg import site as site_protocol
from fedsilo.privacy.secagg.messages import canonical_json
from fedsilo.privacy.secagg.quantize import dequantize, quantize, resolution
from fedsilo.protocol.records import GLOBAL_KEY, SITE_KEY, TASK_KEY, TRAIN_MESSAGE, UPDATE_KEY
from fedsilo.protocol.secagg_records import (
    ADVERTISE_MESSAGE,
    ADVERTS_KEY,
    CONSISTENCY_MESSAGE,
    MASKED_MESSAGE,
    SECAGG_KEY,
    SHARE_MESSAGE,
    UNMASK_MESSAGE,
)
from fedsilo.server.secagg_round import collect_secure_round

from .secagg_harness import (
    SITE_DP_SMALL_NOISE,
    TEMPLATE,
    Harness,
    deltas_with_one_large,
    halted_at,
    make_harness,
    noise_floor_policy,
    secagg_quantization,
)

# Dropping a site at a stage: it stops answering from that stage's message on.
STAGE_MESSAGES = {
    "before key advertisement": ADVERTISE_MESSAGE,
    "after advertising, before sharing": SHARE_MESSAGE,
    "after sharing, before the masked input": MASKED_MESSAGE,
    "after the masked input, during the consistency check": CONSISTENCY_MESSAGE,
    "after the masked input, during unmasking": UNMASK_MESSAGE,
}


def test_sum_without_dropouts_is_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=4)

    state, replies = h.run()

    assert state.total is not None, replies.failures
    np.testing.assert_array_equal(state.total, h.expected_sum(h.names))
    assert [(s["stage"], s["outcome"]) for s in state.stages] == [
        ("advertise_keys", "completed"),
        ("share_keys", "completed"),
        ("collect_masked_inputs", "completed"),
        ("check_consistency", "completed"),
        ("unmask", "completed"),
    ]


@pytest.mark.parametrize("stage", list(STAGE_MESSAGES))
def test_dropouts_up_to_n_minus_t_at_each_stage_give_the_survivors_exact_sum(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=5, threshold=3)
    dropped = ["site-1", "site-3"]  # n - t = 2
    h.grid.drop_from[STAGE_MESSAGES[stage]] = {h.node(n) for n in dropped}

    state, replies = h.run()

    assert state.total is not None, replies.failures
    # Dropping after the masked input still counts it: it is in the sum.
    summed = (
        h.names
        if STAGE_MESSAGES[stage] in (CONSISTENCY_MESSAGE, UNMASK_MESSAGE)
        else [n for n in h.names if n not in dropped]
    )
    assert sorted(state.masked) == sorted(summed)
    np.testing.assert_array_equal(state.total, h.expected_sum(summed))


@pytest.mark.parametrize("stage", list(STAGE_MESSAGES))
def test_below_threshold_at_each_stage_stops_cleanly(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=5, threshold=3)
    h.grid.drop_from[STAGE_MESSAGES[stage]] = {h.node(n) for n in ["site-0", "site-2", "site-4"]}

    state, replies = h.run()

    assert state.total is None
    assert replies.updates.count == 0
    assert "threshold is 3" in replies.failures["secure-aggregation"]
    assert state.stages[-1]["outcome"] == "halted"
    ledgered = [
        e.payload
        for e in read_entries(h.plan.ledger.path)
        if e.kind is EntryKind.SECURE_AGGREGATION_STAGE
    ]
    assert ledgered == state.stages


def test_a_retried_attempt_after_a_halt_completes_with_fresh_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=3, threshold=2)
    h.grid.drop_from[SHARE_MESSAGE] = {h.node("site-0"), h.node("site-1")}
    first, _ = h.run(attempt=1)
    h.grid.drop_from.clear()
    h.grid._gone.clear()

    second, replies = h.run(attempt=2)

    assert first.total is None
    assert second.total is not None, replies.failures
    np.testing.assert_array_equal(second.total, h.expected_sum(h.names))
    assert first.keys["site-2"].mask_public != second.keys["site-2"].mask_public


def test_a_site_replaying_anothers_advertisement_is_named_and_cannot_take_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=3, threshold=2)
    h.run(attempt=1)
    # site-0's signed advertisement of attempt 1 (the server relays it to every peer).
    [old] = [
        m
        for m in h.grid.received
        if m.metadata.message_type == ADVERTISE_MESSAGE
        and m.metadata.src_node_id == h.node("site-0")
    ]
    relayer = h.node("site-2")
    pull = h.grid.pull_messages

    def relayed_first(message_ids: Any) -> list[Message]:
        wanted, replies = list(message_ids), []
        while got := list(pull(wanted)):
            replies += got
        for reply in replies:
            if reply.metadata.src_node_id == relayer and (
                reply.metadata.message_type == ADVERTISE_MESSAGE
            ):
                content, copied = reply.content, old.content
                content.array_records[UPDATE_KEY] = copy.deepcopy(copied.array_records[UPDATE_KEY])
                content.config_records[SITE_KEY] = copy.deepcopy(copied.config_records[SITE_KEY])
        # The relayer answers first: it has nothing to compute.
        return sorted(replies, key=lambda m: m.metadata.src_node_id != relayer)

    monkeypatch.setattr(h.grid, "pull_messages", relayed_first)
    seen = len(read_entries(h.plan.ledger.path))

    second, replies = h.run(attempt=2)

    rejected = [
        e.payload
        for e in read_entries(h.plan.ledger.path)[seen:]
        if e.kind is EntryKind.UPDATE_REJECTED
    ]
    assert [r["sender"] for r in rejected] == [f"node-{relayer} (site-2)"]
    assert "a message site-0 signed, sent by another node" in str(rejected[0]["reason"])
    assert second.total is not None, replies.failures
    np.testing.assert_array_equal(second.total, h.expected_sum(["site-0", "site-1"]))


def test_decoded_mean_is_within_quantization_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=4)
    h.grid.drop_from[MASKED_MESSAGE] = {h.node("site-2")}

    replies = collect_secure_round(
        h.grid, h.plan, TEMPLATE, round_number=1, attempt=1, nodes=h.nodes
    )

    mean = replies.updates.mean()
    survivors = ["site-0", "site-1", "site-3"]
    assert replies.contributors == survivors
    exact = np.mean([flatten(h.sites.deltas[n]) for n in survivors], axis=0)
    error = np.max(np.abs(flatten(mean) - exact))
    assert error <= resolution(secagg_quantization(h)) / 3 + 1e-7  # + fp32 rounding
    assert "num_examples" not in str(replies.metrics)  # no counts travelled


def test_server_never_receives_an_unmasked_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=4)
    h.grid.drop_from[UNMASK_MESSAGE] = {h.node("site-3")}

    state, _ = h.run()

    q = secagg_quantization(h)
    plain = {n: quantize(flatten(h.sites.deltas[n]), q) for n in h.names}
    masked_replies = [
        m
        for m in h.grid.received
        if not m.has_error() and m.metadata.message_type == MASKED_MESSAGE
    ]
    assert len(masked_replies) == 4
    for reply in masked_replies:
        words = np.frombuffer(reply.content.array_records[UPDATE_KEY]["safetensors"].numpy(), "<u4")
        decoded = dequantize(words, q)
        for vector in plain.values():
            # Not the input, and not even close to it: masked words look uniform.
            assert np.count_nonzero(words == vector) <= 1
            assert np.max(np.abs(decoded - dequantize(vector, q))) > 1.0
    # Every other upload is keys, sealed shares or shares the server is owed: no input inside.
    for reply in h.grid.received:
        if reply.has_error():
            continue
        payload = reply.content.array_records[UPDATE_KEY]["safetensors"].numpy().tobytes()
        for vector in plain.values():
            assert vector.tobytes() not in payload
    # A site dropped in unmasking is summed but never unmasked alone: the server holds no
    # mask-key shares of any survivor.
    for reply in state.unmasking.values():
        assert reply.mask_key_shares == {}
    assert state.total is not None


def test_site_refuses_to_unmask_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A curious server asking again with other sets (to get both shares of one site) is refused.
    h = make_harness(tmp_path, monkeypatch, num_sites=3, threshold=2)
    state, _ = h.run()
    context = h.grid.contexts[h.node("site-0")]
    from fedsilo.client.secagg import STATE_KEY

    raw = context.state.config_records[STATE_KEY]["state"]
    session = site_protocol.SiteSession.from_bytes(raw)  # type: ignore[arg-type]

    with pytest.raises(site_protocol.SecAggRefusedError, match="already answered"):
        site_protocol.unmask(
            session,
            survivors={"site-0", "site-1"},
            dropped={"site-2"},
            signers={"site-0", "site-1"},
            min_cohort=1,
        )
    assert state.total is not None


def test_min_cohort_refusal_reaches_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = SitePolicy.model_validate(
        {"accept": {"federation_id": "fed"}, "limits": {"min_cohort": 4}}
    )
    h = make_harness(tmp_path, monkeypatch, num_sites=4, threshold=3, policies={"site-0": policy})
    h.grid.drop_from[SHARE_MESSAGE] = {h.node("site-3")}

    state, replies = h.run()

    # The refusal is unsigned; the node is named with the site it signed as at stage 1.
    reason = replies.failures[f"node-{h.node('site-0')} (site-0)"]
    assert "would sum 3 sites" in reason and "min_cohort 4" in reason
    assert "site-0" not in state.masked
    assert state.total is None  # 2 left of threshold 3: the attempt stops


def test_wrong_length_masked_vector_is_rejected_naming_the_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=4)
    real_mask = site_protocol.mask

    def short_mask(state: site_protocol.SiteSession, words: np.ndarray) -> np.ndarray:
        masked = real_mask(state, words)
        return masked[:-1] if state.site == "site-1" else masked

    monkeypatch.setattr(site_protocol, "mask", short_mask)

    state, replies = h.run()

    reason = replies.failures["site-1"]
    assert "masked vector from site-1 has 104 bytes; expected 108" in reason
    # The rest is summed exactly: site-1 counts as dropped after sharing.
    assert state.total is not None
    np.testing.assert_array_equal(state.total, h.expected_sum(["site-0", "site-2", "site-3"]))


def test_server_cannot_substitute_a_sites_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=3, threshold=2)

    def swap_key(message: Message) -> None:
        # A key the server knows the private half of, in place of site-1's mask key.
        if message.metadata.message_type != SHARE_MESSAGE:
            return
        record = message.content.config_records[ADVERTS_KEY]
        payloads = list(record["payloads"])  # type: ignore[arg-type]
        advert = json.loads(payloads[1])
        advert["mask_public"] = agreement_public_bytes(generate_agreement_key()).hex()
        payloads[1] = canonical_json(advert)
        record["payloads"] = payloads

    h.grid.tamper = swap_key

    state, replies = h.run()

    assert state.total is None
    assert all("not authentic" in r for k, r in replies.failures.items() if k.startswith("site"))
    assert any("not authentic" in r for r in replies.failures.values())


def test_advertise_stage_refuses_a_cohort_below_min_cohort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = SitePolicy.model_validate(
        {"accept": {"federation_id": "fed"}, "limits": {"min_cohort": 5}}
    )
    h = make_harness(tmp_path, monkeypatch, num_sites=4, policies={"site-2": policy})

    state, replies = h.run()

    assert any("policy requires at least 5" in r for r in replies.failures.values())
    assert "site-2" not in state.adverts


def test_site_sends_one_masked_input_per_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=3, threshold=2)
    h.run()
    from fedsilo.client.secagg import STATE_KEY

    raw = h.grid.contexts[h.node("site-1")].state.config_records[STATE_KEY]["state"]
    session = site_protocol.SiteSession.from_bytes(raw)  # type: ignore[arg-type]

    with pytest.raises(site_protocol.SecAggRefusedError, match="already sent its masked input"):
        site_protocol.receive_shares(session, {}, min_cohort=1)


def test_shares_reach_the_server_only_sealed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=4)
    h.run()
    from fedsilo.client.secagg import STATE_KEY

    held = [
        site_protocol.SiteSession.from_bytes(
            h.grid.contexts[h.node(n)].state.config_records[STATE_KEY]["state"]  # type: ignore[arg-type]
        ).held
        for n in h.names
    ]
    points = {b.mask_key_share.hex() for bundles in held for b in bundles.values()}
    points |= {b.self_seed_share.hex() for bundles in held for b in bundles.values()}
    shared = [m for m in h.grid.received if m.metadata.message_type == SHARE_MESSAGE]

    assert len(points) == 2 * 4 * 4 and len(shared) == 4
    for reply in shared:
        payload = reply.content.array_records[UPDATE_KEY]["safetensors"].numpy().tobytes()
        for blob in json.loads(payload).values():  # recipient -> sealed bundle (hex)
            opened = bytes.fromhex(blob)
            for point in points:
                assert point.encode() not in opened
                assert bytes.fromhex(point) not in opened


def test_each_masked_input_is_ledgered_with_the_policy_its_site_declared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = SitePolicy.model_validate(
        {"accept": {"federation_id": "fed"}, "limits": {"min_cohort": 2}}
    )
    h = make_harness(tmp_path, monkeypatch, num_sites=3, threshold=2, policies={"site-0": policy})

    state, _ = h.run()

    assert state.total is not None
    ledgered = [e.payload for e in read_entries(tmp_path / "ledger.sqlite")]
    declared = {
        str(p["site_id"]): {k: v for k, v in p["site_policy"].items() if k != "signature"}
        for p in ledgered
        if "site_policy" in p
    }
    assert declared == {
        "site-0": {"policy_sha256": policy_digest(policy), "min_cohort": 2},
        "site-1": {"policy_sha256": "none", "min_cohort": 1},
        "site-2": {"policy_sha256": "none", "min_cohort": 1},
    }


def _pushed(h: Harness) -> list[Message]:
    """Every request the coordinator pushes from now on, copied as sent."""
    pushed: list[Message] = []
    h.grid.tamper = lambda message: pushed.append(copy.deepcopy(message))
    return pushed


def _send_again(h: Harness, sent: Message, to: str, **session: int) -> str:
    """``sent`` delivered again to ``to`` (its session record changed by ``session``): the
    site's refusal, or "" if it answered."""
    content = copy.deepcopy(sent.content)
    for name, value in session.items():
        content.config_records[SECAGG_KEY][name] = value
    message = Message(
        content,
        dst_node_id=h.node(to),
        message_type=sent.metadata.message_type,
        group_id=sent.metadata.group_id,
    )
    [reply] = h.grid.send_and_receive([message])
    return reply.error.reason if reply.has_error() else ""


def _stored(h: Harness, name: str) -> bytes:
    from fedsilo.client.secagg import STATE_KEY

    raw = h.grid.contexts[h.node(name)].state.config_records[STATE_KEY]["state"]
    assert isinstance(raw, bytes)
    return raw


def _after_a_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Harness, Message]:
    """A harness that ran one secure round, and the first advertisement request it sent."""
    h = make_harness(tmp_path, monkeypatch, num_sites=3, threshold=2)
    pushed = _pushed(h)
    h.run()
    return h, next(m for m in pushed if m.metadata.message_type == ADVERTISE_MESSAGE)


def test_a_site_opens_a_session_once_so_it_cannot_be_made_to_unmask_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After the round, a fresh advertisement under the same session key would reset the site:
    # new keys and seed, nothing masked, no survivor set signed, so the server could replay
    # the survivors' signatures of the session into a second unmasking.
    h = make_harness(tmp_path, monkeypatch, num_sites=3, threshold=2)
    pushed = _pushed(h)
    state, replies = h.run()
    [advert] = [m for m in pushed if m.metadata.message_type == ADVERTISE_MESSAGE][:1]
    before = _stored(h, "site-1")

    refusal = _send_again(h, advert, "site-1")

    assert state.total is not None, replies.failures
    assert "site-1: already opened session fed/run-1/1/1" in refusal
    assert _stored(h, "site-1") == before
    session = site_protocol.SiteSession.from_bytes(before)
    assert session.unmasked and session.signed_survivors is not None


def test_a_session_once_left_for_another_cannot_be_opened_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, advert = _after_a_round(tmp_path, monkeypatch)

    other_attempt = _send_again(h, advert, "site-1", attempt=7)
    after_other = _stored(h, "site-1")
    first_again = _send_again(h, advert, "site-1")

    assert other_attempt == ""  # a new attempt is a new session
    assert "already opened session fed/run-1/1/7" in first_again
    assert "fed/run-1/1/1 is refused" in first_again
    assert _stored(h, "site-1") == after_other


def test_retried_attempts_keep_one_opened_session_per_round_on_the_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A coordinator retrying without end must not grow the site's record with every attempt.
    h, advert = _after_a_round(tmp_path, monkeypatch)
    sessions = tmp_path / "site-1" / "secure-sessions.json"

    answers = [_send_again(h, advert, "site-1", attempt=attempt) for attempt in range(2, 12)]
    next_round = _send_again(h, advert, "site-1", round=2, attempt=1)

    assert answers == [""] * 10
    assert next_round == ""
    assert json.loads(sessions.read_text()) == ["fed/run-1/1/11", "fed/run-1/2/1"]
    assert "already opened session fed/run-1/1/11" in _send_again(h, advert, "site-1", attempt=5)


def test_a_session_stays_opened_across_flower_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A coordinator that restarts (--resume), or a restarted SuperNode, starts a new Flower run:
    # the node's Context starts empty, and only the site's own file still knows the session.
    h, advert = _after_a_round(tmp_path, monkeypatch)
    sessions = tmp_path / "site-1" / "secure-sessions.json"
    assert json.loads(sessions.read_text()) == ["fed/run-1/1/1"]
    h.grid.contexts[h.node("site-1")].state.config_records.clear()

    assert "already opened session fed/run-1/1/1" in _send_again(h, advert, "site-1")
    sessions.write_text("{not json")
    refusal = _send_again(h, advert, "site-1", attempt=2)
    assert "its record of opened sessions cannot be read" in refusal
    assert str(sessions) in refusal


@pytest.mark.parametrize(
    ("privacy", "announced"),
    [
        ({}, "0"),
        ({"site_level": True, "site_clip_norm": 1.0, "site_noise_multiplier": 1e-300}, "1e-300"),
        ({"site_level": True, "site_clip_norm": 1.0, "site_noise_multiplier": 0.5}, "0.5"),
    ],
    ids=["no distributed DP", "1e-300", "0.5"],
)
def test_advertise_stage_refuses_distributed_noise_below_the_policy_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, privacy: dict[str, Any], announced: str
) -> None:
    from fedsilo.client.secagg import STATE_KEY

    h = make_harness(
        tmp_path,
        monkeypatch,
        num_sites=4,
        privacy=privacy,
        policies={"site-2": noise_floor_policy(1.0)},
    )

    state, replies = h.run()

    [reason] = [r for r in replies.failures.values() if "min_distributed_noise" in r]
    assert f"noise multiplier is {announced}; the policy's [privacy] " in reason
    assert "min_distributed_noise_multiplier is 1" in reason
    assert "site-2" not in state.adverts
    assert STATE_KEY not in h.grid.contexts[h.node("site-2")].state.config_records  # no keys
    assert state.total is not None and sorted(state.adverts) == ["site-0", "site-1", "site-3"]


def test_distributed_noise_at_the_policy_floor_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    privacy = {"site_level": True, "site_clip_norm": 1.0, "site_noise_multiplier": 1.0}
    h = make_harness(
        tmp_path,
        monkeypatch,
        num_sites=3,
        privacy=privacy,
        policies={"site-2": noise_floor_policy(1.0)},
    )

    state, replies = h.run()

    assert sorted(state.adverts) == h.names, replies.failures
    assert state.total is not None


@pytest.mark.parametrize("record", [TASK_KEY, GLOBAL_KEY])
@pytest.mark.parametrize("message_type", [TRAIN_MESSAGE, MASKED_MESSAGE])
def test_a_train_message_without_its_task_or_global_adapter_is_a_protocol_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, message_type: str, record: str
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=3, threshold=2)
    pushed = _pushed(h)
    h.grid.drop_from[MASKED_MESSAGE] = set(h.nodes)  # the sites open a session, then stop
    h.run()
    h.grid.drop_from.clear()
    h.grid._gone.clear()
    masked = next(m for m in pushed if m.metadata.message_type == MASKED_MESSAGE)
    content = copy.deepcopy(masked.content)
    del (content.config_records if record == TASK_KEY else content.array_records)[record]
    message = Message(
        content, dst_node_id=masked.metadata.dst_node_id, message_type=message_type, group_id="x"
    )

    [reply] = h.grid.send_and_receive([message])

    what = "round task" if record == TASK_KEY else "global adapter"
    assert reply.error.reason.startswith("ProtocolError: the ")
    assert f"carries no {what} (no '{record}' " in reply.error.reason


def test_an_unclipped_input_under_distributed_dp_halts_the_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=3, privacy=SITE_DP_SMALL_NOISE)
    deltas_with_one_large(h)
    # What a site that skips its L2 clip sends (the masked input hides it from the server).
    monkeypatch.setattr("fedsilo.client.secagg.clip_l2", lambda vector, clip_norm: vector)

    state, replies = h.run()

    assert state.total is None
    reason = replies.failures["secure-aggregation"]
    assert "a site sent an unclipped input" in reason
    halted = halted_at(h, "unmask")
    assert float(halted["sum_norm"]) > float(halted["sum_norm_bound"])


def test_the_same_inputs_clipped_by_every_site_are_summed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=3, privacy=SITE_DP_SMALL_NOISE)
    deltas_with_one_large(h)

    state, replies = h.run()

    assert state.total is not None, replies.failures
    q = secagg_quantization(h)
    bound = state.params.sum_norm_bound(contributors=3, length=state.length)
    assert bound is not None
    assert np.linalg.norm(dequantize(state.total, q)) <= bound
