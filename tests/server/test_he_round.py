"""HE rounds over the Grid: a key the sites make, a server that only adds, and dropouts."""

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal as ts
import torch
from flwr.app import Message

from fedsilo.client.policy import SitePolicy, policy_digest
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.model.flatten import flatten
from fedsilo.privacy.he import ckks
from fedsilo.protocol.he_records import (
    AGREE_MESSAGE,
    DECRYPT_MESSAGE,
    ENCRYPTED_MESSAGE,
    KEYGEN_MESSAGE,
)
from fedsilo.protocol.records import TASK_KEY, UPDATE_KEY
from fedsilo.protocol.secagg_records import ADVERTISE_MESSAGE
from fedsilo.server.he_round import collect_he_round
from fedsilo.server.rounds import RoundReplies

from .secagg_harness import (
    SITE_DP_SMALL_NOISE,
    TEMPLATE,
    Harness,
    deltas_with_one_large,
    halted_at,
    make_harness,
    noise_floor_policy,
)


def _he(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> Harness:
    secure = {"mode": "he", "he_poly_modulus_degree": 4096, **kwargs.pop("secure", {})}  # type: ignore[dict-item]
    return make_harness(tmp_path, monkeypatch, secure=secure, **kwargs)  # type: ignore[arg-type]


def _round(h: Harness, attempt: int = 1) -> RoundReplies:
    return collect_he_round(
        h.grid, h.plan, TEMPLATE, round_number=1, attempt=attempt, nodes=h.nodes
    )


def _mean(h: Harness, names: list[str]) -> np.ndarray:
    return np.mean([flatten(h.sites.deltas[n]) for n in names], axis=0)


class _Replayer:
    """Keeps a copy of every request the coordinator pushes, and sends one again, changed or
    not, to a site of its choice: what a coordinator that deviates from the protocol can do."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.pushed: list[Message] = []
        h.grid.tamper = lambda message: self.pushed.append(copy.deepcopy(message))

    def send(
        self,
        kind: str,
        to: str,
        *,
        sent_to: str | None = None,
        change: Callable[[Any], None] | None = None,
    ) -> str:
        """The first pushed request of ``kind`` (the one pushed to ``sent_to``, if given), its
        "he" record changed by ``change``, sent to ``to``: its refusal, "" if answered."""
        sent = next(
            m
            for m in self.pushed
            if m.metadata.message_type == kind
            and (sent_to is None or m.metadata.dst_node_id == self.h.node(sent_to))
        )
        content = copy.deepcopy(sent.content)
        if change is not None:
            change(content.config_records["he"])
        message = Message(
            content, dst_node_id=self.h.node(to), message_type=kind, group_id=sent.metadata.group_id
        )
        [reply] = self.h.grid.send_and_receive([message])
        return reply.error.reason if reply.has_error() else ""


def test_he_mean_matches_the_plaintext_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _he(tmp_path, monkeypatch, num_sites=3)

    replies = _round(h)

    mean = replies.updates.mean()
    assert replies.contributors == h.names
    np.testing.assert_allclose(flatten(mean), _mean(h, h.names), rtol=0, atol=1e-4)
    assert [s["stage"] for s in replies.stages] == [
        "advertise_keys",
        "key_ceremony",
        "encrypted_inputs",
        "add_ciphertexts",
        "agree_contributors",
        "decrypt_sum",
    ]


def test_server_holds_no_secret_key_and_no_plain_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _he(tmp_path, monkeypatch, num_sites=3)

    _round(h)

    [keys] = [m for m in h.grid.received if m.metadata.message_type == KEYGEN_MESSAGE]
    payload = keys.content.array_records[UPDATE_KEY]["safetensors"].numpy().tobytes()
    _, public, *sealed = ckks.unframe(payload, what="keys")
    ckks.load_context(public, what="server's context", secret=False)  # raises if it held the key
    for blob in sealed:
        with pytest.raises(ckks.HeError):
            ckks.load_context(blob, what="sealed secret")  # sealed: not readable by the server
    inputs = [m for m in h.grid.received if m.metadata.message_type == ENCRYPTED_MESSAGE]
    assert len(inputs) == 3
    for reply in inputs:
        raw = reply.content.array_records[UPDATE_KEY]["safetensors"].numpy().tobytes()
        plain, *chunks = ckks.unframe(raw, what="input")
        assert plain == b"" and len(chunks) == 1  # everything encrypted by default
        for delta in h.sites.deltas.values():
            assert flatten(delta).astype("<f4").tobytes()[:16] not in raw


def test_dropout_after_the_key_ceremony_leaves_the_survivors_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _he(tmp_path, monkeypatch, num_sites=4)
    h.grid.drop_from[ENCRYPTED_MESSAGE] = {h.node("site-2")}

    replies = _round(h)

    survivors = ["site-0", "site-1", "site-3"]
    assert replies.contributors == survivors
    mean = replies.updates.mean()
    np.testing.assert_allclose(flatten(mean), _mean(h, survivors), rtol=0, atol=1e-4)


def test_a_dealer_that_drops_is_replaced_by_the_next_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _he(tmp_path, monkeypatch, num_sites=3)
    h.grid.drop_from[KEYGEN_MESSAGE] = {h.node("site-0")}

    replies = _round(h)

    assert replies.contributors == ["site-1", "site-2"]
    mean = replies.updates.mean()
    np.testing.assert_allclose(flatten(mean), _mean(h, ["site-1", "site-2"]), atol=1e-4)


def _bfv_secret_context(poly_modulus_degree: int) -> bytes:
    context = ts.context(
        ts.SCHEME_TYPE.BFV, poly_modulus_degree=poly_modulus_degree, plain_modulus=1032193
    )
    return bytes(context.serialize(save_secret_key=True))


@pytest.mark.parametrize(
    "deal",
    [
        lambda degree: ckks.new_secret_context(2 * degree),  # another degree than asked
        _bfv_secret_context,  # another scheme
    ],
    ids=["other-degree", "bfv"],
)
def test_a_dealer_whose_context_is_not_the_rounds_is_rejected_and_the_next_site_deals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deal: Callable[[int], bytes]
) -> None:
    # Before: every honest site's upload was rejected by name (other degree), or the attempt
    # halted as a fault of the coordinator (another scheme), and each retry chose that dealer.
    h = _he(tmp_path, monkeypatch, num_sites=3)
    honest = ckks.new_secret_context
    calls: list[int] = []

    def first_dealer_deals_wrong(degree: int) -> bytes:
        calls.append(degree)
        return deal(degree) if len(calls) == 1 else honest(degree)

    monkeypatch.setattr(ckks, "new_secret_context", first_dealer_deals_wrong)

    replies = _round(h)

    assert "the dealer's public context" in replies.failures["site-0"]
    assert replies.contributors == ["site-1", "site-2"]
    np.testing.assert_allclose(
        flatten(replies.updates.mean()), _mean(h, ["site-1", "site-2"]), atol=1e-4
    )


def test_a_site_refuses_a_sealed_key_that_is_not_the_dealers_signed_public_contexts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dealer sealing each peer a key of its own made every decrypted sum garbage and every
    # honest decryptor look wrong, every attempt; each site now checks its key and names it.
    import fedsilo.client.he as client_he

    h = _he(tmp_path, monkeypatch, num_sites=3)
    seal = client_he.seal

    def site_0_seals_another_key_for_each_peer(
        key: bytes, secret: bytes, associated: bytes
    ) -> bytes:
        # The associated data names the dealer and the peer (client.he._key_contexts).
        dealt_by_site_0 = b"\nhe-seal\n" in associated and b"\nsite-0\nsite-" in associated
        wrong = ckks.new_secret_context(4096) if dealt_by_site_0 else secret
        return seal(key, wrong, associated=associated)

    monkeypatch.setattr(client_he, "seal", site_0_seals_another_key_for_each_peer)

    replies = _round(h)

    assert replies.updates.count == 0
    for peer in ("site-1", "site-2"):
        reason = replies.failures[f"node-{h.node(peer)} ({peer})"]
        assert f"site {peer}: the CKKS key dealer site-0 sealed for it is not the key" in reason
    # The retry is dealt by the next site by name, whose key every site accepts.
    retried = _round(h, attempt=2)
    assert retried.contributors == h.names, retried.failures


def test_decryption_falls_to_the_next_contributor_and_below_threshold_halts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _he(tmp_path, monkeypatch, num_sites=3)
    h.grid.drop_from[DECRYPT_MESSAGE] = {h.node("site-0")}
    ok = _round(h)
    h.grid.drop_from[ENCRYPTED_MESSAGE] = {h.node("site-1"), h.node("site-2")}

    halted = _round(h, attempt=2)

    assert ok.contributors == h.names
    assert halted.updates.count == 0
    assert "threshold is 2" in halted.failures["secure-aggregation"]


def test_a_site_refuses_to_decrypt_a_sum_below_its_min_cohort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strict = SitePolicy.model_validate(
        {"accept": {"federation_id": "fed"}, "limits": {"min_cohort": 3}}
    )
    h = _he(tmp_path, monkeypatch, num_sites=3, policies={n: strict for n in ["site-0", "site-1"]})
    h.grid.drop_from[ENCRYPTED_MESSAGE] = {h.node("site-2")}

    replies = _round(h)

    assert replies.updates.count == 0
    refusals = [r for r in replies.failures.values() if "decrypts only sums of at least 3" in r]
    assert len(refusals) == 2


def test_only_the_selected_tensors_are_encrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _he(tmp_path, monkeypatch, num_sites=3, secure={"he_tensors": ["lora_B"]})

    replies = _round(h)

    mean = replies.updates.mean()
    np.testing.assert_allclose(flatten(mean), _mean(h, h.names), atol=1e-4)
    [first, *_] = [m for m in h.grid.received if m.metadata.message_type == ENCRYPTED_MESSAGE]
    plain, *_chunks = ckks.unframe(
        first.content.array_records[UPDATE_KEY]["safetensors"].numpy().tobytes(), what="input"
    )
    assert len(plain) == 4 * TEMPLATE["a.lora_A"].numel()  # lora_A in the clear, B encrypted


def test_distributed_dp_noise_is_added_by_the_sites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    privacy = {"site_level": True, "site_clip_norm": 10.0, "site_noise_multiplier": 1.0}
    h = _he(tmp_path, monkeypatch, num_sites=3, privacy=privacy)
    replies = _round(h)

    mean = replies.updates.mean()
    noise = flatten(mean) - _mean(h, h.names)
    # Threshold 2: each site adds std 10/sqrt(2); the sum of 3 has std 10*sqrt(3/2); mean /3.
    expected = 10.0 * np.sqrt(3 / 2) / 3
    assert 0.5 * expected < float(noise.std()) < 1.6 * expected


def test_each_encrypted_input_is_ledgered_with_the_policy_its_site_declared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = SitePolicy.model_validate(
        {"accept": {"federation_id": "fed"}, "limits": {"min_cohort": 2}}
    )
    h = _he(tmp_path, monkeypatch, num_sites=3, policies={"site-2": policy})

    replies = _round(h)

    assert replies.contributors == h.names
    ledgered = [e.payload for e in read_entries(tmp_path / "ledger.sqlite")]
    declared = {
        str(p["site_id"]): {k: v for k, v in p["site_policy"].items() if k != "signature"}
        for p in ledgered
        if "site_policy" in p
    }
    assert declared == {
        "site-0": {"policy_sha256": "none", "min_cohort": 1},
        "site-1": {"policy_sha256": "none", "min_cohort": 1},
        "site-2": {"policy_sha256": policy_digest(policy), "min_cohort": 2},
    }


def test_a_site_sends_one_encrypted_input_and_decrypts_once_per_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A coordinator asking a site that decrypted for another input (to have it decrypt again,
    # one site's ciphertext this time), or the dealer for another key, is refused.
    h = _he(tmp_path, monkeypatch, num_sites=3)
    replay = _Replayer(h)
    h.grid.drop_from[DECRYPT_MESSAGE] = {h.node("site-0")}  # site-1 decrypts the sum
    _round(h)
    h.grid.drop_from.clear()
    h.grid._gone.clear()  # site-0, the dealer, answers again

    def again(kind: str, name: str) -> str:
        return replay.send(kind, name, sent_to=name)

    assert "already sent its encrypted input" in again(ENCRYPTED_MESSAGE, "site-1")
    assert "already decrypted a sum" in again(DECRYPT_MESSAGE, "site-1")
    assert "already sent its encrypted input" in again(ENCRYPTED_MESSAGE, "site-2")
    assert "already holds a CKKS key for this session" in again(KEYGEN_MESSAGE, "site-0")


def _requiring(aggregation: str) -> SitePolicy:
    return SitePolicy.model_validate(
        {"accept": {"federation_id": "fed", "aggregation": aggregation}}
    )


def test_a_site_whose_policy_requires_he_takes_part_only_with_nothing_trained_in_the_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policies = {"site-2": _requiring("he")}
    whole = _round(_he(tmp_path / "all", monkeypatch, num_sites=3, policies=policies))
    partial = _he(
        tmp_path / "some", monkeypatch, num_sites=3, policies=policies,
        secure={"he_tensors": ["lora_B"]},
    )  # fmt: skip

    replies = _round(partial)

    assert whole.contributors == ["site-0", "site-1", "site-2"]
    assert replies.contributors == ["site-0", "site-1"]
    [reason] = [r for r in replies.failures.values() if "in the clear" in r]
    assert "send 1 trained tensor(s) in the clear (e.g. a.lora_A)" in reason


def test_a_site_whose_policy_requires_secagg_refuses_an_he_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _he(tmp_path, monkeypatch, num_sites=3, policies={"site-1": _requiring("secagg")})

    replies = _round(h)

    assert replies.contributors == ["site-0", "site-2"]
    assert any("accepts only aggregation = 'secagg'" in r for r in replies.failures.values())


def test_a_site_decrypts_only_inputs_their_contributors_signed_never_one_passed_off_as_a_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The coordinator relays site-0's encrypted input under every contributor's name: its
    # decryption would be site-0's update alone.
    h = _he(tmp_path, monkeypatch, num_sites=3)

    def one_input_as_all(message: Message) -> None:
        if message.metadata.message_type != DECRYPT_MESSAGE:
            return
        record = message.content.config_records["he"]
        record["payloads"] = [record["payloads"][0]] * 3  # type: ignore[index]
        record["signatures"] = [record["signatures"][0]] * 3  # type: ignore[index]

    h.grid.tamper = one_input_as_all

    replies = _round(h)

    assert replies.updates.count == 0
    refusals = [r for r in replies.failures.values() if "is not signed by it" in r]
    assert refusals and "the input relayed as site-1's is not signed by it" in refusals[0]


def test_a_site_decrypts_only_a_set_it_agreed_on_after_sending_its_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dealer (site-0) gets no input request in the round; sites 1 and 2 contribute and
    # agree. The coordinator then asks the dealer to decrypt, to agree, and to send its input.
    h = _he(tmp_path, monkeypatch, num_sites=3)
    replay = _Replayer(h)
    h.grid.drop_from[ENCRYPTED_MESSAGE] = {h.node("site-0")}
    ok = _round(h)
    h.grid.drop_from.clear()
    h.grid._gone.clear()

    def to_dealer(kind: str) -> str:
        # The dealer's own input request (captured, never delivered), or any other of ``kind``.
        return replay.send(kind, "site-0", sent_to="site-0" if kind == ENCRYPTED_MESSAGE else None)

    assert ok.contributors == ["site-1", "site-2"]
    assert "not over the contributor set this site agreed on" in to_dealer(DECRYPT_MESSAGE)
    assert "sent no encrypted input in this session" in to_dealer(AGREE_MESSAGE)
    assert to_dealer(ENCRYPTED_MESSAGE) == ""  # its input, late
    assert "the contributor set must hold this site" in to_dealer(AGREE_MESSAGE)


def test_the_dealer_refuses_a_cohort_larger_than_the_round_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 5 sites, announced as 3 at threshold 2: the key would go to 5 holders, of which 2 is no
    # majority. Every dealer in turn refuses, and the attempt halts.
    h = _he(tmp_path, monkeypatch, num_sites=5, min_sites=2)

    def announce_three(message: Message) -> None:
        record = message.content.config_records["secagg"]
        record["cohort_size"], record["threshold"] = 3, 2

    h.grid.tamper = announce_three

    replies = _round(h)

    assert replies.updates.count == 0
    assert any(
        "5 sites advertised keys for a round announced with cohort size 3" in reason
        for reason in replies.failures.values()
    )


def test_no_site_decrypts_a_second_contributor_set_so_sums_cannot_be_differenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After site-0 decrypted the sum of sites 0, 1 and 2, the coordinator asks site-1 for the
    # sum of sites 1 and 2 (their difference would be site-0's update).
    h = _he(tmp_path, monkeypatch, num_sites=3)
    replay = _Replayer(h)
    _round(h)

    def two_of_three(record: Any) -> None:
        record["contributors"] = ["site-1", "site-2"]
        for field in ("payloads", "signatures"):
            if field in record:
                record[field] = record[field][1:]
        record["agreed_by"] = ["site-1", "site-2"]
        record["agreement_signatures"] = record["agreement_signatures"][1:]

    assert "already agreed on a contributor set" in replay.send(
        AGREE_MESSAGE,
        "site-1",
        change=lambda record: record.__setitem__("contributors", ["site-1", "site-2"]),
    )
    assert "not over the contributor set this site agreed on" in replay.send(
        DECRYPT_MESSAGE, "site-1", change=two_of_three
    )


def test_a_site_told_other_parameters_than_the_dealer_cannot_open_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # site-2 alone is told threshold 3 (the others 2): a lower or higher threshold for one
    # site would let the coordinator count signatures or size noise differently there.
    h = _he(tmp_path, monkeypatch, num_sites=3)
    site_2 = h.node("site-2")

    def other_threshold_for_site_2(message: Message) -> None:
        if message.metadata.dst_node_id == site_2:
            message.content.config_records["secagg"]["threshold"] = 3

    h.grid.tamper = other_threshold_for_site_2

    replies = _round(h)

    assert replies.contributors == ["site-0", "site-1"]
    assert any("the sealed CKKS key" in reason for reason in replies.failures.values())


def test_an_agreement_signed_in_one_attempt_is_not_one_of_another() -> None:
    from fedsilo.privacy.secagg.masking import SessionId
    from fedsilo.protocol.he_records import contributors_statement

    sites = ["site-0", "site-1"]
    first, second = SessionId("fed", "run", 1, 1), SessionId("fed", "run", 1, 2)

    assert contributors_statement(first, sites) != contributors_statement(second, sites)
    assert contributors_statement(first, sites[::-1]) == contributors_statement(first, sites)


@pytest.mark.parametrize("he_tensors", [[], ["lora_A"]], ids=["all-encrypted", "partly-plain"])
def test_an_unclipped_he_input_under_distributed_dp_halts_the_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, he_tensors: list[str]
) -> None:
    h = _he(
        tmp_path, monkeypatch, num_sites=3, privacy=SITE_DP_SMALL_NOISE,
        secure={"he_tensors": he_tensors},
    )  # fmt: skip
    deltas_with_one_large(h)
    # What a site that skips its L2 clip sends (encrypted, the server cannot see it alone).
    monkeypatch.setattr("fedsilo.client.he.clip_l2", lambda vector, clip_norm: vector)

    replies = _round(h)

    assert replies.updates.count == 0
    assert "a site sent an unclipped input" in replies.failures["secure-aggregation"]
    halted = halted_at(h, "decrypt_sum")
    assert float(halted["sum_norm"]) > float(halted["sum_norm_bound"])


def test_he_inputs_clipped_by_every_site_are_summed_under_distributed_dp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _he(tmp_path, monkeypatch, num_sites=3, privacy=SITE_DP_SMALL_NOISE)
    deltas_with_one_large(h)

    replies = _round(h)

    assert replies.updates.count == 1, replies.failures


def test_an_input_too_large_for_any_update_fails_the_round_instead_of_overflowing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Encrypted inputs are bounded by nobody on arrival: the decrypted sum is checked against
    # the contributors' count times the per-update bound before it reaches the global adapter.
    h = _he(tmp_path, monkeypatch, num_sites=3)
    h.sites.deltas["site-0"] = {
        name: torch.full_like(tensor, 5e4) for name, tensor in h.sites.deltas["site-0"].items()
    }

    replies = _round(h)

    # Every signer's sum is out of range: the input is the cause, and HE cannot say whose, so
    # the attempt halts with each signer's result as evidence and no site is rejected.
    assert replies.updates.count == 0
    assert list(replies.failures) == ["secure-aggregation"]
    assert (
        "every decrypted sum (3 signers) is out of range" in replies.failures["secure-aggregation"]
    )
    halted = halted_at(h, "decrypt_sum")
    assert sorted(halted["out_of_range"]) == h.names
    assert "above the bound" in halted["out_of_range"]["site-0"]


def test_a_decryptor_returning_an_out_of_range_sum_is_passed_over_for_the_next_signer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.privacy.he import ckks

    h = _he(tmp_path, monkeypatch, num_sites=3)
    decrypt, calls = ckks.decrypt, []

    def first_decryptor_lies(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        values = decrypt(*args, **kwargs)
        return [v + 1e6 for v in values] if len(calls) == 1 else values

    monkeypatch.setattr(ckks, "decrypt", first_decryptor_lies)

    replies = _round(h)

    # The next signer's sum is used; the first's stays on record, and nobody is rejected
    # (an out-of-range input would have made the first sum fail just the same).
    assert replies.contributors == h.names
    assert replies.failures == {}
    np.testing.assert_allclose(flatten(replies.updates.mean()), _mean(h, h.names), atol=1e-4)
    [stage] = [
        e.payload
        for e in read_entries(h.plan.ledger.path)
        if e.kind is EntryKind.SECURE_AGGREGATION_STAGE and e.payload["stage"] == "decrypt_sum"
    ]
    assert stage["outcome"] == "completed"
    assert list(stage["out_of_range"]) == ["site-0"]  # type: ignore[arg-type]


def test_an_he_site_opens_a_session_once_so_its_key_and_input_are_never_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.client.he import HE_STATE_KEY
    from fedsilo.client.secagg import STATE_KEY

    h = _he(tmp_path, monkeypatch, num_sites=3)
    replay = _Replayer(h)
    _round(h)
    records = h.grid.contexts[h.node("site-1")].state.config_records
    before = (copy.deepcopy(records[STATE_KEY]), copy.deepcopy(records[HE_STATE_KEY]))

    refusal = replay.send(ADVERTISE_MESSAGE, "site-1", sent_to="site-1")

    assert "site-1: already opened session fed/run-1/1/1" in refusal
    assert (records[STATE_KEY], records[HE_STATE_KEY]) == before


def test_an_he_round_with_distributed_noise_below_a_sites_floor_is_refused_before_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.client.he import HE_STATE_KEY
    from fedsilo.client.secagg import STATE_KEY

    floor = noise_floor_policy(2.0)
    privacy = {"site_level": True, "site_clip_norm": 1.0, "site_noise_multiplier": 0.5}
    h = _he(tmp_path, monkeypatch, num_sites=4, privacy=privacy, policies={"site-3": floor})

    replies = _round(h)

    assert replies.contributors == ["site-0", "site-1", "site-2"]
    [reason] = [r for r in replies.failures.values() if "min_distributed" in r]
    assert (
        "noise multiplier is 0.5; the policy's [privacy] min_distributed_noise_multiplier is 2"
        in (reason)
    )
    records = h.grid.contexts[h.node("site-3")].state.config_records
    assert STATE_KEY not in records and HE_STATE_KEY not in records


def test_a_site_with_a_noise_floor_sends_nothing_trained_in_the_clear_in_an_he_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The noise meets the floor, but he_tensors name no tensor of the adapter: every trained
    # tensor would leave in the clear with this site's noise share alone.
    floor = noise_floor_policy(0.5)
    privacy = {"site_level": True, "site_clip_norm": 1.0, "site_noise_multiplier": 0.5}
    h = _he(
        tmp_path, monkeypatch, num_sites=4, privacy=privacy, policies={"site-3": floor},
        secure={"he_tensors": ["no-such-tensor"]},
    )  # fmt: skip

    replies = _round(h)

    assert "site-3" not in replies.contributors
    [reason] = [r for r in replies.failures.values() if "in the clear" in r]
    assert "the policy accepts only [privacy] min_distributed_noise_multiplier = 0.5" in reason


def test_an_encrypted_input_request_without_its_round_task_is_a_protocol_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _he(tmp_path, monkeypatch, num_sites=3)
    replay = _Replayer(h)
    h.grid.drop_from[ENCRYPTED_MESSAGE] = set(h.nodes)
    _round(h)
    h.grid.drop_from.clear()
    h.grid._gone.clear()
    sent = next(
        m
        for m in replay.pushed
        if m.metadata.message_type == ENCRYPTED_MESSAGE
        and m.metadata.dst_node_id == h.node("site-1")
    )
    content = copy.deepcopy(sent.content)
    del content.config_records[TASK_KEY]
    message = Message(content, dst_node_id=h.node("site-1"), message_type=ENCRYPTED_MESSAGE)

    [reply] = h.grid.send_and_receive([message])

    assert reply.error.reason.startswith(
        "ProtocolError: the encrypted-input request carries no round task (no 'task' "
    )
