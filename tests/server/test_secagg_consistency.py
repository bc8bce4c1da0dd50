"""Bonawitz's consistency check against a coordinator that lies about who dropped out.

The lying coordinators below run the real first three stages, then replace the last two with
their own, over the same grid and the real site handlers: they are what a modified coordinator
could send. The property checked is that no site's masked input is ever unmasked alone: the
server never receives both the self-mask seed shares and the mask-key shares of a site whose
masked input it holds.
"""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from fedsilo.client.secagg import STATE_KEY
from fedsilo.crypto import (
    SignatureError,
    agreement_key_from_bytes,
    decode_signature,
    expand_mask,
    sign_update,
    verify_update,
)
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.model.flatten import flatten
from fedsilo.privacy.secagg import site as site_protocol
from fedsilo.privacy.secagg.consistency import CONSISTENCY_STAGE, survivor_binding
from fedsilo.privacy.secagg.masking import SessionId, pairwise_mask
from fedsilo.privacy.secagg.messages import UNMASK_STAGE, SecAggParams, UnmaskReply
from fedsilo.privacy.secagg.quantize import RING_DTYPE, quantize
from fedsilo.privacy.secagg.recovery import recover_sum
from fedsilo.privacy.secagg.shamir import Share, combine
from fedsilo.protocol.records import UPDATE_KEY
from fedsilo.protocol.secagg_records import (
    CONSISTENCY_MESSAGE,
    SURVIVOR_SIGNATURES_KEY,
    SURVIVORS_KEY,
    UNMASK_KEY,
    UNMASK_MESSAGE,
    survivor_signatures_record,
    survivors_record,
    unmask_record,
)
from fedsilo.server import secagg_round
from fedsilo.server.secagg_round import (
    SecAggRound,
    SecAggState,
    exchange,
    require_sites,
    session_content,
)

from .secagg_harness import Harness, make_harness, secagg_quantization

TARGET = "site-4"  # the site whose input the lying coordinator wants to see alone
TOLD_IT_DROPPED = ["site-0", "site-1"]  # the sites told that TARGET dropped out

Stage = Callable[[SecAggRound, SecAggState], None]


class LyingCoordinator:
    """Tells ``liars_to`` that TARGET dropped out (and everyone else the truth), then asks
    each site for the shares its view calls for, forwarding the signatures it chooses."""

    def __init__(self, liars_to: list[str], *, forward: str) -> None:
        self.liars_to = liars_to
        self.forward = forward  # "all" signatures, or only those "matching" the site's view
        self.views: dict[str, list[str]] = {}
        self.signatures: dict[str, bytes] = {}

    def consistency(self, ctx: SecAggRound, state: SecAggState) -> None:
        everyone = sorted(state.masked)
        lie = [site for site in everyone if site != TARGET]
        self.views = {site: lie if site in self.liars_to else everyone for site in everyone}
        contents = {
            state.node_of[site]: session_content(
                state, {SURVIVORS_KEY: survivors_record(self.views[site])}
            )
            for site in everyone
        }
        accepted = exchange(
            ctx,
            state,
            contents,
            message_type=CONSISTENCY_MESSAGE,
            stage=CONSISTENCY_STAGE,
            max_bytes=1 << 20,
        )
        self.signatures = {site: upload.signature for site, (upload, _) in accepted.items()}

    def unmask(self, ctx: SecAggRound, state: SecAggState) -> None:
        contents = {}
        for site in self.signatures:
            view = self.views[site]
            forwarded = {
                signer: signature
                for signer, signature in self.signatures.items()
                if self.forward == "all" or self.views[signer] == view
            }
            dropped = sorted(set(state.sealed) - set(view))
            contents[state.node_of[site]] = session_content(
                state,
                {
                    UNMASK_KEY: unmask_record(view, dropped),
                    SURVIVOR_SIGNATURES_KEY: survivor_signatures_record(forwarded),
                },
            )
        accepted = exchange(
            ctx,
            state,
            contents,
            message_type=UNMASK_MESSAGE,
            stage=UNMASK_STAGE,
            max_bytes=1 << 20,
        )
        for site, (upload, _) in accepted.items():
            view = set(self.views[site])
            state.unmasking[site] = UnmaskReply.from_payload(
                upload.payload, site=site, survivors=view, dropped=set(state.sealed) - view
            )
        require_sites(ctx, state, "unmask", list(state.unmasking))

    def stages(self) -> tuple[Stage, ...]:
        honest = secagg_round.STAGES[:3]
        return (*honest, self.consistency, self.unmask)


def shares_received(h: Harness, kind: str, site: str) -> int:
    """How many ``kind`` shares of ``site`` reached the server in unmasking replies."""
    count = 0
    for reply in h.grid.received:
        if reply.has_error() or reply.metadata.message_type != UNMASK_MESSAGE:
            continue
        payload = reply.content.array_records[UPDATE_KEY]["safetensors"].numpy().tobytes()
        count += site in json.loads(payload)[kind]
    return count


def error_reasons(h: Harness, message_type: str) -> list[str]:
    return [
        m.error.reason
        for m in h.grid.received
        if m.has_error() and m.metadata.message_type == message_type
    ]


@pytest.mark.parametrize("forward", ["all", "matching"])
def test_a_coordinator_telling_some_sites_a_site_dropped_never_gets_both_of_its_secrets(
    forward: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=5, threshold=3)
    liar = LyingCoordinator(TOLD_IT_DROPPED, forward=forward)
    monkeypatch.setattr(secagg_round, "STAGES", liar.stages())

    state, replies = h.run()

    assert TARGET in state.masked  # the server holds the target's masked input ...
    assert sorted(liar.signatures) == h.names  # ... and every site signed the view it was shown
    # ... but no site sent a share of the target's mask key: its input is never unmasked alone.
    assert shares_received(h, "mask_key_shares", TARGET) == 0
    refusals = error_reasons(h, UNMASK_MESSAGE)
    if forward == "all":
        # Every site sees signatures over a set other than its own, and refuses.
        assert len(refusals) == 5
        assert all("not over the survivor set this site signed" in r for r in refusals)
        assert state.total is None
        assert "threshold is 3" in replies.failures["secure-aggregation"]
        stages = [
            e.payload
            for e in read_entries(h.plan.ledger.path)
            if e.kind is EntryKind.SECURE_AGGREGATION_STAGE
        ]
        assert stages[-1]["stage"] == "unmask" and stages[-1]["outcome"] == "halted"
    else:
        # The two sites told the lie hold two signatures on it, below the threshold: they
        # refuse. The three told the truth unmask the true survivors' sum, and only that.
        assert len(refusals) == 2
        assert all("2 survivors signed the survivor set; the threshold is 3" in r for r in refusals)
        assert sorted(state.unmasking) == ["site-2", "site-3", "site-4"]
    for site in TOLD_IT_DROPPED:
        assert f"node-{h.node(site)} ({site})" in replies.failures


def test_a_coordinator_telling_every_site_a_site_dropped_learns_only_the_others_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=5, threshold=3)
    others = [n for n in h.names if n != TARGET]
    liar = LyingCoordinator(list(h.names), forward="all")
    monkeypatch.setattr(secagg_round, "STAGES", liar.stages())

    state, replies = h.run()

    # The target will not sign a set without itself; the others sign the lie and unmask it,
    # as they would after a real dropout: the server gets the target's mask-key shares ...
    assert any(
        "the survivor set must hold this site" in r for r in error_reasons(h, CONSISTENCY_MESSAGE)
    )
    assert sorted(liar.signatures) == others
    assert shares_received(h, "mask_key_shares", TARGET) == 4
    # ... and never a share of its self-mask seed, so its masked input stays masked: with its
    # pairwise masks removed it is still the input plus PRG(seed), nowhere near the input.
    assert shares_received(h, "self_seed_shares", TARGET) == 0
    mask_key = combine(
        [Share.from_bytes(*reply.mask_key_shares[TARGET]) for reply in state.unmasking.values()],
        threshold=3,
    )
    key = agreement_key_from_bytes(mask_key)
    peeled = state.masked[TARGET].copy()
    for peer in others:
        peeled -= pairwise_mask(
            state.session, TARGET, key, peer, state.keys[peer].mask_public, len(peeled)
        )
    plain = quantize(flatten(h.sites.deltas[TARGET]), secagg_quantization(h)).astype(RING_DTYPE)
    assert np.count_nonzero(peeled == plain) <= 1
    # What it can compute is the sum of the four others, as if the target had dropped out.
    others_sum = recover_sum(
        session=state.session,
        threshold=3,
        adverts=state.keys,
        masked={n: state.masked[n] for n in others},
        replies=state.unmasking,
        dropped={TARGET},
    ).total
    np.testing.assert_array_equal(others_sum, h.expected_sum(others))
    # Asking again, now for the target's seed, is refused by every site.
    context = h.grid.contexts[h.node("site-0")]
    raw = context.state.config_records[STATE_KEY]["state"]
    session = site_protocol.SiteSession.from_bytes(raw)  # type: ignore[arg-type]
    with pytest.raises(site_protocol.SecAggRefusedError, match="already answered"):
        site_protocol.unmask(
            session, survivors=set(h.names), dropped=set(), signers=set(h.names), min_cohort=1
        )
    assert replies.failures.get("secure-aggregation") is None


def test_survivor_set_and_its_signatures_are_ledgered_and_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=4)
    h.grid.drop_from[CONSISTENCY_MESSAGE] = {h.node("site-3")}  # summed, but signs nothing

    state, replies = h.run()

    assert state.total is not None, replies.failures
    np.testing.assert_array_equal(state.total, h.expected_sum(h.names))
    [entry] = [
        e.payload
        for e in read_entries(h.plan.ledger.path)
        if e.kind is EntryKind.SECURE_AGGREGATION_STAGE
        and e.payload["stage"] == "check_consistency"
    ]
    assert entry["survivors"] == h.names
    assert entry["sites"] == ["site-0", "site-1", "site-2"]
    signatures = entry["signatures"]
    assert isinstance(signatures, dict) and sorted(signatures) == entry["sites"]
    keys = h.plan.membership.site_keys()
    for site, text in signatures.items():
        assert isinstance(text, str)
        binding = survivor_binding(state.session, site, h.names)
        verify_update(keys[site], binding, decode_signature(text))
        with pytest.raises(SignatureError):  # bound to the set: another set does not verify
            verify_update(
                keys[site],
                survivor_binding(state.session, site, h.names[:3]),
                decode_signature(text),
            )
    assert sorted(state.unmasking) == ["site-0", "site-1", "site-2"]  # only signers are asked


def _sessions_after_masking(
    names: list[str], threshold: int
) -> dict[str, site_protocol.SiteSession]:
    """Site sessions of ``names`` that have shared keys and received their shares."""
    session = SessionId("fed", "run-1", 1, 1)
    params = SecAggParams(
        threshold=threshold,
        cohort_size=len(names),
        clip=1.0,
        dp_clip_norm=0.0,
        dp_noise_multiplier=0.0,
    )
    states = {n: site_protocol.advertise(site=n, session=session, params=params) for n in names}
    cohort = {n: s.advertisement() for n, s in states.items()}
    sealed: dict[str, dict[str, bytes]] = {}
    for name in names:
        states[name], sealed[name] = site_protocol.share_keys(states[name], cohort)
    return {
        name: site_protocol.receive_shares(
            states[name],
            {sender: sealed[sender][name] for sender in names if sender != name},
            min_cohort=1,
        )
        for name in names
    }


def test_a_site_signs_one_survivor_set_that_holds_itself_and_only_key_sharers() -> None:
    names = ["a", "b", "c", "d", "e"]
    state = _sessions_after_masking(names, 3)["a"]

    with pytest.raises(site_protocol.SecAggRefusedError, match="must hold this site"):
        site_protocol.agree_survivors(state, {"b", "c", "d"}, min_cohort=1)
    with pytest.raises(site_protocol.SecAggRefusedError, match=r"unknown: \['z'\]"):
        site_protocol.agree_survivors(state, {"a", "b", "z"}, min_cohort=1)
    with pytest.raises(site_protocol.SecAggRefusedError, match="would sum 2 sites"):
        site_protocol.agree_survivors(state, {"a", "b"}, min_cohort=1)
    with pytest.raises(site_protocol.SecAggRefusedError, match="would sum 3 sites"):
        site_protocol.agree_survivors(state, {"a", "b", "c"}, min_cohort=4)
    signed, statement = site_protocol.agree_survivors(state, {"a", "b", "c"}, min_cohort=1)
    assert signed.signed_survivors == ("a", "b", "c")
    assert site_protocol.SiteSession.from_bytes(signed.to_bytes()) == signed
    assert b'"survivors":["a","b","c"]' in statement
    with pytest.raises(site_protocol.SecAggRefusedError, match="already signed"):
        site_protocol.agree_survivors(signed, {"a", "b", "c", "d"}, min_cohort=1)


def test_a_site_unmasks_only_the_set_it_signed_with_threshold_signers() -> None:
    names = ["a", "b", "c", "d", "e"]
    state = _sessions_after_masking(names, 3)["a"]
    with pytest.raises(site_protocol.SecAggRefusedError, match="not the set this site signed"):
        site_protocol.unmask(  # nothing signed yet
            state, survivors=set(names), dropped=set(), signers=set(names), min_cohort=1
        )
    signed, _ = site_protocol.agree_survivors(state, {"a", "b", "c", "d"}, min_cohort=1)

    with pytest.raises(site_protocol.SecAggRefusedError, match="not the set this site signed"):
        site_protocol.unmask(
            signed,
            survivors={"a", "b", "c"},
            dropped={"d", "e"},
            signers={"a", "b", "c"},
            min_cohort=1,
        )
    with pytest.raises(site_protocol.SecAggRefusedError, match="2 survivors signed"):
        site_protocol.unmask(
            signed, survivors={"a", "b", "c", "d"}, dropped={"e"}, signers={"a", "b"}, min_cohort=1
        )
    with pytest.raises(site_protocol.SecAggRefusedError, match="survivors signed"):
        site_protocol.unmask(  # a signer outside the set cannot have signed it
            signed,
            survivors={"a", "b", "c", "d"},
            dropped={"e"},
            signers={"a", "b", "e"},
            min_cohort=1,
        )
    done, reply = site_protocol.unmask(
        signed, survivors={"a", "b", "c", "d"}, dropped={"e"}, signers={"a", "b", "c"}, min_cohort=1
    )
    assert sorted(reply.self_seed_shares) == ["a", "b", "c", "d"]
    assert sorted(reply.mask_key_shares) == ["e"]
    assert done.unmasked


def test_unmasking_request_without_signatures_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=3, threshold=2)

    def strip_signatures(message: Message) -> None:
        if message.metadata.message_type == UNMASK_MESSAGE:
            del message.content.config_records[SURVIVOR_SIGNATURES_KEY]

    h.grid.tamper = strip_signatures

    state, replies = h.run()

    assert state.total is None
    reasons = error_reasons(h, UNMASK_MESSAGE)
    assert len(reasons) == 3
    assert all("carries no signatures on the survivor set" in r for r in reasons)
    assert "threshold is 2" in replies.failures["secure-aggregation"]


COLLUDER = "site-3"  # hands its session to the coordinator and signs whatever it is asked


class CollusionAttack:
    """A coordinator with one colluding site: the target and site-0 are shown the true survivor
    set, site-1 and site-2 a set without the target; the colluder signs both sets and gives its
    own shares of both of the target's secrets."""

    TRUTH = (TARGET, "site-0")
    LIE = ("site-1", "site-2")

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.signatures: dict[str, dict[str, bytes]] = {"truth": {}, "lie": {}}
        self.replies: dict[str, UnmaskReply] = {}
        self.refusals: list[str] = []
        self.state: SecAggState | None = None

    def views(self, state: SecAggState) -> dict[str, list[str]]:
        everyone = sorted(state.masked)
        return {"truth": everyone, "lie": [s for s in everyone if s != TARGET]}

    def consistency(self, ctx: SecAggRound, state: SecAggState) -> None:
        views = self.views(state)
        contents = {
            state.node_of[site]: session_content(
                state, {SURVIVORS_KEY: survivors_record(views[view])}
            )
            for view, sites in (("truth", self.TRUTH), ("lie", self.LIE))
            for site in sites
        }
        accepted = exchange(
            ctx,
            state,
            contents,
            message_type=CONSISTENCY_MESSAGE,
            stage=CONSISTENCY_STAGE,
            max_bytes=1 << 20,
        )
        for site, (upload, _) in accepted.items():
            self.signatures["truth" if site in self.TRUTH else "lie"][site] = upload.signature
        colluder_key = self.h.sites.sites[self.h.names.index(COLLUDER)].signing_key
        for view, survivors in views.items():
            binding = survivor_binding(state.session, COLLUDER, survivors)
            self.signatures[view][COLLUDER] = sign_update(colluder_key, binding)

    def unmask(self, ctx: SecAggRound, state: SecAggState) -> None:
        views = self.views(state)
        contents = {}
        for view, sites in (("truth", self.TRUTH), ("lie", self.LIE)):
            dropped = sorted(set(state.sealed) - set(views[view]))
            request = {
                UNMASK_KEY: unmask_record(views[view], dropped),
                SURVIVOR_SIGNATURES_KEY: survivor_signatures_record(self.signatures[view]),
            }
            for site in sites:
                contents[state.node_of[site]] = session_content(state, request)
        accepted = exchange(
            ctx, state, contents, message_type=UNMASK_MESSAGE, stage=UNMASK_STAGE, max_bytes=1 << 20
        )
        for site, (upload, _) in accepted.items():
            view = set(views["truth" if site in self.TRUTH else "lie"])
            self.replies[site] = UnmaskReply.from_payload(
                upload.payload, site=site, survivors=view, dropped=set(state.sealed) - view
            )
        self.refusals = error_reasons(self.h, UNMASK_MESSAGE)
        self.state = state

    def stages(self) -> tuple[Stage, ...]:
        return (*secagg_round.STAGES[:3], self.consistency, self.unmask)


@pytest.mark.parametrize("threshold", [3, 4])
def test_one_colluding_site_breaks_a_majority_threshold_of_five_but_not_a_threshold_of_four(
    threshold: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/secure-aggregation.md: the check holds while 2 * threshold > n + colluding sites.
    h = make_harness(tmp_path, monkeypatch, num_sites=5, threshold=threshold)
    attack = CollusionAttack(h)
    monkeypatch.setattr(secagg_round, "STAGES", attack.stages())

    h.run()

    assert attack.state is not None
    colluder = site_protocol.SiteSession.from_bytes(
        h.grid.contexts[h.node(COLLUDER)].state.config_records[STATE_KEY]["state"]  # type: ignore[arg-type]
    ).held[TARGET]
    seed_points = [
        r.self_seed_shares[TARGET]
        for r in attack.replies.values()
        if r.self_seed_shares.get(TARGET)
    ]
    key_points = [
        r.mask_key_shares[TARGET] for r in attack.replies.values() if r.mask_key_shares.get(TARGET)
    ]
    seed_points.append((colluder.x, colluder.self_seed_share))
    key_points.append((colluder.x, colluder.mask_key_share))
    if threshold == 4:
        # 3 signatures on each set, one short: every honest site refuses.
        assert len(attack.refusals) == 4
        assert all(
            "3 survivors signed the survivor set; the threshold is 4" in r for r in attack.refusals
        )
        assert len(seed_points) == len(key_points) == 1  # the colluder's own points only
        return
    # Threshold 3: 2 + 1 shares of each secret, and the target's input comes out in the clear.
    assert attack.refusals == []
    assert len(seed_points) == len(key_points) == 3
    seed = combine([Share.from_bytes(x, y) for x, y in seed_points], threshold=3)
    key = agreement_key_from_bytes(
        combine([Share.from_bytes(x, y) for x, y in key_points], threshold=3)
    )
    state = attack.state
    peeled = state.masked[TARGET] - expand_mask(seed, len(state.masked[TARGET]))
    for peer in h.names:
        if peer != TARGET:
            peeled -= pairwise_mask(
                state.session, TARGET, key, peer, state.keys[peer].mask_public, len(peeled)
            )
    plain = quantize(flatten(h.sites.deltas[TARGET]), secagg_quantization(h)).astype(RING_DTYPE)
    np.testing.assert_array_equal(peeled, plain)


def test_a_site_refuses_to_share_keys_with_more_sites_than_the_round_announced() -> None:
    # A coordinator announces 3 sites at threshold 2 (a majority of 3) and relays 5
    # advertisements: with shares at 5 holders, {v, a} and {b, c} could each sign a different
    # survivor set, one group revealing v's self-mask seed and the other its mask key.
    names = ["a", "b", "c", "d", "v"]
    session = SessionId("fed", "run-1", 1, 1)
    announced = SecAggParams(
        threshold=2, cohort_size=3, clip=1.0, dp_clip_norm=0.0, dp_noise_multiplier=0.0
    )
    states = {n: site_protocol.advertise(site=n, session=session, params=announced) for n in names}
    cohort = {n: s.advertisement() for n, s in states.items()}

    with pytest.raises(site_protocol.SecAggRefusedError, match="cohort size 3 and threshold 2"):
        site_protocol.share_keys(states["v"], cohort)
    # The announced three share keys as before.
    three = {n: cohort[n] for n in ("a", "b", "v")}
    _, sealed = site_protocol.share_keys(states["v"], three)
    assert sorted(sealed) == ["a", "b"]


def test_a_site_shares_its_keys_once_so_a_second_cohort_cannot_unmask_its_input() -> None:
    # The attack: after a's masked input over {a, b, c}, ask a to share again and to mask a
    # second input over everyone; a's held shares were reset by the second sharing, so an
    # unmasking naming {a, d, e} survivors and {b, c} dropped would hand out a's self-mask
    # seed and b's and c's mask keys: everything that hides a's first input.
    names = ["a", "b", "c", "d", "e"]
    state = _sessions_after_masking(names, 3)["a"]
    assert state.input_sent

    with pytest.raises(site_protocol.SecAggRefusedError, match="already shared its keys"):
        site_protocol.share_keys(state, state.peers)
    with pytest.raises(site_protocol.SecAggRefusedError, match="already sent its masked input"):
        site_protocol.receive_shares(state, {}, min_cohort=1)
    # What the site stores says so too.
    stored = site_protocol.SiteSession.from_bytes(state.to_bytes())
    assert stored == state and stored.input_sent


def test_a_site_opens_shares_only_after_sharing_its_keys() -> None:
    session = SessionId("fed", "run-1", 1, 1)
    params = SecAggParams(
        threshold=2, cohort_size=3, clip=1.0, dp_clip_norm=0.0, dp_noise_multiplier=0.0
    )
    fresh = site_protocol.advertise(site="a", session=session, params=params)

    with pytest.raises(site_protocol.SecAggRefusedError, match="has not shared its keys"):
        site_protocol.receive_shares(fresh, {}, min_cohort=1)
