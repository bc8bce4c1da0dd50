"""The coordinator folds each update into the round's sum as it arrives and lets it go."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedsilo.config import FedsiloConfig
from fedsilo.protocol.records import TRAIN_MESSAGE
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.inprocess_grid import InProcessGrid

from .conftest import run_with_grid


class HeldRepliesGrid(InProcessGrid):
    """Records, before each site trains, how many earlier train replies are still alive."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alive: weakref.WeakSet[Message] = weakref.WeakSet()
        self.held_at_delivery: list[int] = []
        self.messages_alive: list[int] = []

    def _deliver(self, message: Message, node: int) -> Message:
        if message.metadata.message_type != TRAIN_MESSAGE:
            return super()._deliver(message, node)
        gc.collect()
        self.held_at_delivery.append(len(self.alive))
        reply = super()._deliver(message, node)
        self.alive.add(reply)
        return reply


def test_the_server_holds_at_most_one_reply_while_the_next_site_trains(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(task={"num_sites": 6}, run={"rounds": 1})
    grids: list[HeldRepliesGrid] = []

    class Watched(HeldRepliesGrid):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            grids.append(self)

    run_with_grid(config, tmp_path / "run", grid_class=Watched)

    [grid] = grids
    assert len(grid.held_at_delivery) == 6
    # The reply just handled may still be bound to a local; none before it is.
    assert max(grid.held_at_delivery) <= 1, grid.held_at_delivery
    [round_one] = [m for m in RunFolder(tmp_path / "run").read_metrics() if m["round"] == 1]
    assert round_one["sites_ok"] == 6
