from pathlib import Path

import torch

from fedsilo.server.run_folder import Checkpoint, RunFolder


def _checkpoint(round_number: int) -> Checkpoint:
    return Checkpoint(
        round=round_number,
        adapter={"w": torch.full((2,), float(round_number))},
        server_state={"m.w": torch.ones(2)},
        record={"round": round_number, "gold_accuracy": 0.5},
    )


def test_checkpoint_round_trips(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.save_checkpoint(_checkpoint(2))

    loaded = folder.load_checkpoint(2)

    assert torch.equal(loaded.adapter["w"], torch.full((2,), 2.0))
    assert torch.equal(loaded.server_state["m.w"], torch.ones(2))
    assert loaded.record == {"round": 2, "gold_accuracy": 0.5}


def test_half_written_checkpoint_is_ignored(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.save_checkpoint(_checkpoint(1))
    # What a crash in the middle of writing round 2 leaves behind: a temporary folder.
    (folder.checkpoints_dir / ".round-2.abc.tmp").mkdir()

    assert folder.checkpoint_rounds() == [1]
    assert folder.latest_checkpoint_round() == 1


def test_metrics_append_keeps_previous_lines(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.append_metrics({"round": 0})
    folder.append_metrics({"round": 1})

    assert [r["round"] for r in folder.read_metrics()] == [0, 1]
