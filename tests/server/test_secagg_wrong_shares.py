"""A wrong unmasking share cannot stop secure aggregation or change its sum.

An enrolled site signs (with its own key) unmasking replies whose shares are altered, or deals
a peer a share off its polynomial; the server rebuilds every secret from shares that fit its
owner's commitment, ledgers which shares were off (holder and owner: it cannot tell who lied),
and the sum is exact to the bit. Only when fewer than ``threshold`` right shares are left does
the attempt halt, and then without a sum.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedsilo.ledger import EntryKind, read_entries
from fedsilo.privacy.secagg import recovery
from fedsilo.privacy.secagg import site as site_protocol
from fedsilo.privacy.secagg.recovery import RecoveryError, _rebuild
from fedsilo.privacy.secagg.shamir import PRIME, SHARE_BYTES, Share, combine, split
from fedsilo.protocol.secagg_records import MASKED_MESSAGE, UNMASK_MESSAGE

from .secagg_harness import Harness, make_harness
from .test_hostile_secure_replies import _rejections, tamper_replies


def _shifted(hex_y: str, by: int = 1) -> str:
    """Another point: y + by in the field."""
    return ((int(hex_y, 16) + by) % PRIME).to_bytes(SHARE_BYTES, "big").hex()


def _moved(share: list[object], by: int) -> list[object]:
    return [share[0], _shifted(str(share[1]), by)]


def _alter(
    kind: str, owners: Callable[[str], bool], change: Callable[[list[object]], list[object]]
) -> Callable[[bytes], bytes]:
    """An unmasking payload with ``change`` applied to the ``kind`` shares of chosen owners."""

    def altered(honest: bytes) -> bytes:
        value = json.loads(honest)
        for owner, share in value[kind].items():
            if owners(owner):
                value[kind][owner] = change(share)
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    return altered


def _wrong_y(share: list[object]) -> list[object]:
    return [share[0], _shifted(str(share[1]))]


def _every(_: str) -> bool:
    return True


def _unmask_entry(h: Harness) -> dict[str, Any]:
    [entry] = [
        entry.payload
        for entry in read_entries(h.plan.ledger.path)
        if entry.kind is EntryKind.SECURE_AGGREGATION_STAGE and entry.payload["stage"] == "unmask"
    ]
    return dict(entry)


def test_a_wrong_self_seed_share_is_left_out_and_the_sum_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=4, threshold=3)
    # site-0's share comes first in every rebuild: without the search the sum could not open.
    lie = _alter("self_seed_shares", lambda owner: owner == "site-2", _wrong_y)
    tamper_replies(h, monkeypatch, site="site-0", message_type=UNMASK_MESSAGE, payload=lie)

    state, replies = h.run()

    assert state.total is not None, replies.failures
    np.testing.assert_array_equal(state.total, h.expected_sum(h.names))
    entry = _unmask_entry(h)
    assert entry["outcome"] == "completed"
    assert entry["off_polynomial"] == {"site-2": ["site-0"]}
    # The server cannot tell a lying holder from a bad dealer: it rejects neither.
    assert _rejections(h) == {}


def test_the_audit_report_notes_the_shares_left_out_and_a_halt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.server.report_data import _notes

    h = make_harness(tmp_path, monkeypatch, num_sites=4, threshold=3)
    lie = _alter("self_seed_shares", lambda owner: owner == "site-2", _wrong_y)
    tamper_replies(h, monkeypatch, site="site-0", message_type=UNMASK_MESSAGE, payload=lie)
    h.run()
    h.grid.drop_from[UNMASK_MESSAGE] = {h.node("site-1"), h.node("site-3")}
    h.run(attempt=2)

    notes = _notes(read_entries(h.plan.ledger.path))

    assert notes == (
        "round 1 attempt 1: the unmasking left out the shares of site-2's secret held by "
        "site-0: off the polynomial its commitment fits (sent wrong by the holder, or dealt "
        "wrong by site-2); the sum did not use them",
        "round 1 attempt 2: secure aggregation halted at unmask: secure aggregation stopped at "
        "unmask: 2 sites left, the threshold is 3",
    )


@pytest.mark.parametrize(
    ("liar", "change"),
    [
        ("site-1", _wrong_y),
        # site-3 holds x = 4; it claims x = 1 (site-0's) with a made-up y.
        ("site-3", lambda share: [1, _shifted(str(share[1]))]),
    ],
    ids=["wrong y for every owner", "another holder's x"],
)
def test_a_site_lying_about_every_share_is_named_for_each_owner(
    liar: str,
    change: Callable[[list[object]], list[object]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=4, threshold=3)
    lie = _alter("self_seed_shares", _every, change)
    tamper_replies(h, monkeypatch, site=liar, message_type=UNMASK_MESSAGE, payload=lie)

    state, _ = h.run()

    assert state.total is not None
    np.testing.assert_array_equal(state.total, h.expected_sum(h.names))
    assert _unmask_entry(h)["off_polynomial"] == {name: [liar] for name in h.names}


def test_a_wrong_mask_key_share_of_a_dropout_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=5, threshold=3)
    h.grid.drop_from[MASKED_MESSAGE] = {h.node("site-4")}  # shared keys, sent no input
    lie = _alter("mask_key_shares", _every, _wrong_y)
    tamper_replies(h, monkeypatch, site="site-0", message_type=UNMASK_MESSAGE, payload=lie)

    state, _ = h.run()

    assert state.total is not None
    np.testing.assert_array_equal(state.total, h.expected_sum(h.names[:4]))
    assert _unmask_entry(h)["off_polynomial"] == {"site-4": ["site-0"]}
    assert list(_rejections(h)) == ["node-1004 (site-4)"]  # the dropout, ledgered as before


def test_a_bad_share_dealt_to_one_holder_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """site-2 deals site-0 a share of its seed that is off its polynomial: the holder is
    honest, so the evidence names both and the server rejects neither."""
    h = make_harness(tmp_path, monkeypatch, num_sites=4, threshold=3)
    dealing = {"site": "", "corrupted": False}
    share_keys, honest_split = site_protocol.share_keys, site_protocol.split

    def dealt(state: site_protocol.SiteSession, cohort: Any) -> Any:
        dealing["site"] = state.site
        return share_keys(state, cohort)

    def bad_split(secret: bytes, *, threshold: int, count: int) -> list[Share]:
        shares = honest_split(secret, threshold=threshold, count=count)
        if dealing["site"] == "site-2" and not dealing["corrupted"]:  # its seed's sharing
            dealing["corrupted"] = True
            shares[0] = Share(shares[0].x, (shares[0].y + 1) % PRIME)  # site-0's point
        return shares

    monkeypatch.setattr(site_protocol, "share_keys", dealt)
    monkeypatch.setattr(site_protocol, "split", bad_split)

    state, _ = h.run()

    assert dealing["corrupted"]
    assert state.total is not None
    np.testing.assert_array_equal(state.total, h.expected_sum(h.names))
    assert _unmask_entry(h)["off_polynomial"] == {"site-2": ["site-0"]}
    assert _rejections(h) == {}


def test_two_liars_among_five_are_both_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=5, threshold=3)
    for liar, shift in (("site-0", 1), ("site-3", 2)):  # uncoordinated: see below
        lie = _alter("self_seed_shares", _every, lambda share, by=shift: _moved(share, by))
        tamper_replies(h, monkeypatch, site=liar, message_type=UNMASK_MESSAGE, payload=lie)

    state, _ = h.run()

    assert state.total is not None
    np.testing.assert_array_equal(state.total, h.expected_sum(h.names))
    off = _unmask_entry(h)["off_polynomial"]
    assert off == {name: ["site-0", "site-3"] for name in h.names}


def test_too_few_right_shares_halt_the_attempt_without_a_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=4, threshold=3)
    # Shifts that differ between the liars: two liars shifting by the same amount would lie on
    # a polynomial through zero and rebuild the right secret with one honest share.
    for liar, shift in (("site-0", 1), ("site-1", 2)):
        lie = _alter("self_seed_shares", _every, lambda share, by=shift: _moved(share, by))
        tamper_replies(h, monkeypatch, site=liar, message_type=UNMASK_MESSAGE, payload=lie)

    state, replies = h.run()

    assert state.total is None
    failure = replies.failures["secure-aggregation"]
    assert "could not unmask the sum: no 3 of the 4 shares of the self-mask seed of site-0" in (
        failure
    )
    entry = _unmask_entry(h)
    assert (entry["outcome"], entry["reason"]) == ("halted", failure)


def test_shares_found_off_before_a_halt_are_ledgered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=4, threshold=3)
    # site-3 lies about site-0's seed alone (left out, the rebuild goes on); site-1 and site-2
    # then both lie about site-1's seed, which leaves too few right shares.
    alone = _alter("self_seed_shares", lambda owner: owner == "site-0", _wrong_y)
    tamper_replies(h, monkeypatch, site="site-3", message_type=UNMASK_MESSAGE, payload=alone)
    for liar, shift in (("site-1", 1), ("site-2", 2)):
        lie = _alter(
            "self_seed_shares", lambda owner: owner == "site-1", lambda sh, by=shift: _moved(sh, by)
        )
        tamper_replies(h, monkeypatch, site=liar, message_type=UNMASK_MESSAGE, payload=lie)

    state, _ = h.run()

    assert state.total is None
    entry = _unmask_entry(h)
    assert entry["outcome"] == "halted"
    assert "self-mask seed of site-1" in entry["reason"]
    assert entry["off_polynomial"] == {"site-0": ["site-3"]}


SEED = bytes(range(32))


def _fits_seed(secret: bytes) -> bool:
    return hashlib.sha256(secret).digest() == hashlib.sha256(SEED).digest()


def _points(secret: bytes, *, threshold: int, count: int) -> dict[str, tuple[int, bytes]]:
    shares = split(secret, threshold=threshold, count=count)
    return {f"h{share.x:02d}": (share.x, share.to_bytes()) for share in shares}


def _seed_rebuild(
    points: dict[str, tuple[int, bytes]], *, threshold: int, suspects: frozenset[str] = frozenset()
) -> tuple[bytes, list[str]]:
    """SEED's owner's rebuild from ``points`` held by h01, h02, ... at x = 1, 2, ..."""
    x_of = {f"h{x:02d}": x for x in range(1, len(points) + 1)}
    return _rebuild(
        "owner",
        "self-mask seed",
        points,
        x_of=x_of,
        threshold=threshold,
        fits=_fits_seed,
        suspects=set(suspects),
    )


def test_shares_dealt_for_another_secret_name_their_owner() -> None:
    # The owner committed to SEED but dealt shares of another secret: no subset fits.
    points = _points(bytes(32), threshold=3, count=5)
    with pytest.raises(RecoveryError, match="owner dealt shares that are not on one polynomial"):
        _seed_rebuild(points, threshold=3)


def test_the_search_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "MAX_SUBSETS", 50)
    points = _points(bytes(32), threshold=6, count=11)  # C(11, 6) = 462 subsets
    with pytest.raises(RecoveryError, match="none of 50 subsets of 6 of its 11 shares"):
        _seed_rebuild(points, threshold=6)


def test_a_caught_holder_is_left_out_first(monkeypatch: pytest.MonkeyPatch) -> None:
    points = _points(SEED, threshold=3, count=5)
    x, y = points["h01"]
    points["h01"] = (x, bytes.fromhex(_shifted(y.hex())))
    calls = []

    def counted(shares: list[Share], *, threshold: int) -> bytes:
        calls.append(tuple(share.x for share in shares))
        return combine(shares, threshold=threshold)

    monkeypatch.setattr(recovery, "combine", counted)
    found = [
        _seed_rebuild(points, threshold=3, suspects=suspects)
        for suspects in (frozenset(), frozenset({"h01"}))
    ]

    assert found == [(SEED, ["h01"]), (SEED, ["h01"])]
    # Unknown, the liar costs one failed rebuild; once caught, none.
    assert calls == [(1, 2, 3), (2, 3, 4), (2, 3, 4)]
