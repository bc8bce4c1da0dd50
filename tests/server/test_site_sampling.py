"""Which sites a round asks: under site-level DP with sampling, the draw is the one accounted."""

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedsilo.config import FedsiloConfig
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.server import federation
from fedsilo.server.federation import FederationError, sample_sites
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.inprocess_grid import FIRST_NODE_ID, InProcessGrid

from ..simulation.conftest import run_with_grid
from ..simulation.test_dropouts import crashing

SITE_DP = {"site_level": True, "site_clip_norm": 0.1, "site_noise_multiplier": 2.0}


def _asked_share(draws: Iterable[list[int]], node: int, count: int) -> float:
    return sum(node in draw for draw in draws) / count


def test_a_roster_draw_gives_online_sites_the_accounted_sampling_rate() -> None:
    online, rounds = [11, 12, 13], 3000

    def draws(roster_size: int | None) -> Iterator[list[int]]:
        for round_number in range(rounds):
            yield sample_sites(
                online,
                count=2,
                seed=0,
                round_number=round_number,
                attempt=1,
                roster_size=roster_size,
            )

    with_roster = list(draws(10))
    assert all(set(draw) <= set(online) and len(draw) <= 2 for draw in with_roster)
    for node in online:
        # 2 of 10 enrolled, 7 of them offline: each online site is asked in a fifth of rounds.
        assert _asked_share(with_roster, node, rounds) == pytest.approx(0.2, abs=0.03)
        # Drawing from the online nodes alone asks each in two thirds of rounds.
        assert _asked_share(draws(None), node, rounds) == pytest.approx(2 / 3, abs=0.03)


class _ThirdNodeOffline(InProcessGrid):
    """The third enrolled site never connects: it is not among the grid's nodes."""

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in super().get_node_ids() if node != FIRST_NODE_ID + 2]


def _fixed_entropy(monkeypatch: pytest.MonkeyPatch, values: list[int]) -> None:
    """The coordinator's secure draws take ``values`` in turn (the last one repeats)."""
    queue = list(values)

    def randbits(bits: int) -> int:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    monkeypatch.setattr(federation, "secrets", SimpleNamespace(randbits=randbits))


def _asked_per_attempt(run_dir: Path, round_number: int) -> list[list[int]]:
    return [
        entry.payload["nodes"]
        for entry in read_entries(RunFolder(run_dir).ledger_path)
        if entry.kind is EntryKind.ROUND_OPENED and entry.payload["round"] == round_number
    ]


def test_an_offline_site_drawn_is_a_dropout_not_replaced_by_an_online_one(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Entropy 0 draws slots 1 and 2 of 3; slot 2 is the offline site.
    _fixed_entropy(monkeypatch, [0])
    config = make_config(
        run={"rounds": 1}, privacy=SITE_DP, strategy={"sites_per_round": 2, "min_sites": 1}
    )

    reporter = run_with_grid(config, tmp_path / "run", grid_class=_ThirdNodeOffline)

    assert _asked_per_attempt(tmp_path / "run", 1) == [[FIRST_NODE_ID + 1]]
    final = RunFolder(tmp_path / "run").read_metrics()[-1]
    assert final["sites_ok"] == 1
    offline = "1 of the 2 sites drawn from the 3 enrolled are offline"
    assert any(offline in notice for notice in reporter.notices)
    [aggregated] = [
        entry.payload
        for entry in read_entries(RunFolder(tmp_path / "run").ledger_path)
        if entry.kind is EntryKind.ROUND_AGGREGATED
    ]
    assert aggregated["site_dp_event"]["sites_per_round"] == 2
    assert aggregated["site_dp_event"]["num_sites"] == 3


def test_a_retried_round_asks_the_same_sites_again(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Entropy 0 draws the second and third sites (the third always crashes); a fresh draw with
    # entropy 1 would take the first two and succeed, which the accounting does not allow.
    _fixed_entropy(monkeypatch, [0, 1])
    config = make_config(
        run={"rounds": 1},
        privacy=SITE_DP,
        strategy={"sites_per_round": 2, "min_sites": 2, "max_round_attempts": 3},
    )

    with pytest.raises(FederationError, match="round 1: fewer than min_sites=2"):
        run_with_grid(config, tmp_path / "run", crashing({2}))

    assert _asked_per_attempt(tmp_path / "run", 1) == [[FIRST_NODE_ID + 1, FIRST_NODE_ID + 2]] * 3


def test_without_site_level_dp_a_retry_draws_again(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(
        run={"rounds": 1, "seed": 0},
        strategy={"sites_per_round": 2, "min_sites": 2, "max_round_attempts": 4},
    )

    run_with_grid(config, tmp_path / "run", crashing({1}))

    # The run's seed draws the second site in attempts 1 and 2, not in attempt 3.
    asked = _asked_per_attempt(tmp_path / "run", 1)
    assert len(asked) == 3
    assert FIRST_NODE_ID + 1 in asked[0] and FIRST_NODE_ID + 1 not in asked[-1]


class _FirstNodeOnly(InProcessGrid):
    def get_node_ids(self) -> Iterable[int]:
        return [FIRST_NODE_ID]


def test_a_draw_of_offline_sites_only_fails_the_round_saying_so(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fixed_entropy(monkeypatch, [0])  # slots 1 and 2: both offline
    config = make_config(
        run={"rounds": 1},
        privacy=SITE_DP,
        strategy={"sites_per_round": 2, "min_sites": 1, "max_round_attempts": 2},
    )

    with pytest.raises(FederationError, match="after 2 attempts; every site drawn is offline"):
        run_with_grid(config, tmp_path / "run", grid_class=_FirstNodeOnly)

    assert _asked_per_attempt(tmp_path / "run", 1) == [[], []]
