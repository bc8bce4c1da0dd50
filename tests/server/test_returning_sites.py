"""The wait before a round's draw for sites that were connected at the previous one."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from fedsilo.server.returning_sites import wait_for_returning_sites


class ReconnectingGrid:
    """A grid whose connected nodes change as (fake) time passes: ``timeline`` maps a time
    to the nodes connected from then on."""

    def __init__(self, timeline: dict[float, list[int]]) -> None:
        self.timeline = timeline
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds

    def get_node_ids(self) -> Iterable[int]:
        return self.timeline[max(t for t in self.timeline if t <= self.now)]


def _wait(grid: ReconnectingGrid, *, expected: int, wait_s: float) -> tuple[list[int], list[str]]:
    notices: list[str] = []
    online = wait_for_returning_sites(
        grid,  # type: ignore[arg-type]
        expected=expected,
        wait_s=wait_s,
        notice=notices.append,
        round_number=3,
        clock=grid.clock,
        sleep=grid.sleep,
    )
    return online, notices


def test_a_restarted_site_that_rejoins_within_the_wait_is_drawn() -> None:
    grid = ReconnectingGrid({0.0: [2, 1], 4.5: [1, 2, 9]})  # node 9: the restarted SuperNode
    online, notices = _wait(grid, expected=3, wait_s=30)
    assert online == [1, 2, 9]
    assert 4.5 <= grid.now < 6  # stopped waiting as soon as it was back
    assert notices == [
        "round 3: 2 of the 3 sites connected at the last draw are connected; waiting up to "
        "30 s for the others to rejoin"
    ]


def test_a_site_that_stays_away_costs_the_wait_once_and_is_named() -> None:
    grid = ReconnectingGrid({0.0: [1, 2]})
    online, notices = _wait(grid, expected=3, wait_s=30)
    assert online == [1, 2]
    assert grid.now == pytest.approx(30)
    assert notices[-1] == "round 3: drawing from the 2 sites connected after 30 s"
    # The next draw expects only the two that came: no second wait.
    online, notices = _wait(grid, expected=len(online), wait_s=30)
    assert (online, notices, grid.now) == ([1, 2], [], pytest.approx(30))


@pytest.mark.parametrize(("expected", "wait_s"), [(2, 30.0), (0, 30.0), (3, 0.0)])
def test_no_wait_when_every_site_is_back_or_waiting_is_off(expected: int, wait_s: float) -> None:
    grid = ReconnectingGrid({0.0: [1, 2]})
    assert _wait(grid, expected=expected, wait_s=wait_s) == ([1, 2], [])
    assert grid.now == 0
