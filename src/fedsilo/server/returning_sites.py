"""A round's wait for the sites that were connected at the previous draw.

A site whose SuperNode died mid-round marks its old node offline and starts a new one; that
ends the round at once (Flower reports the node gone), and the next round would draw from
the sites connected a second later, leaving out the one still reconnecting. So before a draw,
the coordinator waits (bounded) until as many sites are connected as at the previous draw.
A site that stays away is waited for once: the next draw expects only those that came.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.serverapp import Grid

POLL_S = 1.0


def wait_for_returning_sites(
    grid: Grid,
    *,
    expected: int,
    wait_s: float,
    notice: Callable[[str], None],
    round_number: int,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """The connected node ids, once at least ``expected`` are connected or ``wait_s`` passed."""
    online = sorted(grid.get_node_ids())
    if len(online) >= expected or wait_s <= 0:
        return online
    notice(
        f"round {round_number}: {len(online)} of the {expected} sites connected at the last "
        f"draw are connected; waiting up to {wait_s:g} s for the others to rejoin"
    )
    deadline = clock() + wait_s
    while len(online) < expected and clock() < deadline:
        sleep(min(POLL_S, max(deadline - clock(), 0.0)))
        online = sorted(grid.get_node_ids())
    if len(online) < expected:
        notice(
            f"round {round_number}: drawing from the {len(online)} sites connected after "
            f"{wait_s:g} s"
        )
    return online
