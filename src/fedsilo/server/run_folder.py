"""The run folder contract, and crash-safe checkpoints inside it.

RUN/
  config.toml            the resolved configuration
  run.json               base model hash, versions, start time
  metrics.jsonl          one JSON object per round (round 0 = before training)
  checkpoints/round-N/   adapter.safetensors, server_state.safetensors, round.json
  final/                 the final adapter as a PEFT folder
  status.json            "running" | "completed" | "failed" with the reason
  federation.json        federation id, run id, pinned coordinator and site public keys
  ledger.db              the signed, hash-chained audit ledger (SQLite)

A checkpoint folder appears only complete (built in a temporary folder, fsynced, renamed),
and it holds the round's metrics record too, so metrics.jsonl can always be rebuilt from the
checkpoints after a crash between the two writes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedsilo.crypto import sha256_hex
from fedsilo.ledger import JsonValue
from fedsilo.model.adapters import AdapterState, load_adapter, save_adapter
from fedsilo.storage import atomic_folder, read_json_object, write_text_atomic

# Canonical names only: "round-01", "round-1\\n" or non-ASCII digits would alias a round.
_ROUND_DIR = re.compile(r"round-(0|[1-9][0-9]*)", re.ASCII)


SERVER_STATE_FILE = "server_state.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """The global state after a round."""

    round: int
    adapter: AdapterState
    server_state: dict[str, torch.Tensor]
    record: dict[str, Any]  # the round's metrics line


def server_state_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """A strategy's state as the safetensors bytes its checkpoint file holds (the same state
    always gives the same bytes, so the ledger can record their sha256)."""
    return save_safetensors({name: state[name].detach().contiguous() for name in sorted(state)})


def server_state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """The sha256 the ledger records for a strategy's state: that of its checkpoint file."""
    return sha256_hex(server_state_bytes(state))


def check_server_state(state: Mapping[str, torch.Tensor], *, like: AdapterState, what: str) -> None:
    """Raise ValueError unless every entry of a strategy's state is ``<kind>.<adapter tensor>``
    with that tensor's shape, fp32 and finite: what a checkpoint's state must be before a
    resumed run applies it."""
    for key, value in state.items():
        _, _, name = key.partition(".")
        if name not in like:
            raise ValueError(f"{what}: entry {key!r} names no tensor of the adapter")
        if value.dtype != torch.float32 or tuple(value.shape) != tuple(like[name].shape):
            raise ValueError(
                f"{what}: entry {key!r} is {value.dtype} {tuple(value.shape)}, expected "
                f"torch.float32 {tuple(like[name].shape)}"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{what}: entry {key!r} holds NaN or infinite values")


def record_digest(record: Mapping[str, Any]) -> str:
    """sha256 hex of a round's metrics record, as the ledger records it (``metrics_sha256``).

    The text hashed is ``json.dumps(record, sort_keys=True, separators=(",", ":"),
    ensure_ascii=True)``, which a record read back from metrics.jsonl or round.json
    reproduces exactly.
    """
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def final_file_digests(final_dir: Path) -> dict[str, JsonValue]:
    """File name -> sha256 hex of every file in final/, as ``run_finished`` records it
    (``final_files``): the audit and `fedsilo export` hold final/ to exactly these files."""
    return {
        item.name: hashlib.sha256(item.read_bytes()).hexdigest()
        for item in sorted(Path(final_dir).iterdir())
    }


class RunFolder:
    """Paths and reads/writes of one run's folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def run_info_path(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.root / "final"

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.db"

    @property
    def membership_path(self) -> Path:
        return self.root / "federation.json"

    @property
    def status_path(self) -> Path:
        return self.root / "status.json"

    def checkpoint_dir(self, round_number: int) -> Path:
        return self.checkpoints_dir / f"round-{round_number}"

    def checkpoint_rounds(self) -> list[int]:
        """Rounds with a complete checkpoint, ascending (temporary folders are ignored)."""
        if not self.checkpoints_dir.is_dir():
            return []
        rounds = []
        for entry in self.checkpoints_dir.iterdir():
            match = _ROUND_DIR.fullmatch(entry.name)
            if match and entry.is_dir():
                rounds.append(int(match.group(1)))
        return sorted(rounds)

    def latest_checkpoint_round(self) -> int | None:
        rounds = self.checkpoint_rounds()
        return rounds[-1] if rounds else None

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write a round's checkpoint; an existing one for that round is an error."""
        with atomic_folder(self.checkpoint_dir(checkpoint.round)) as folder:
            save_adapter(checkpoint.adapter, folder / "adapter.safetensors")
            (folder / SERVER_STATE_FILE).write_bytes(server_state_bytes(checkpoint.server_state))
            (folder / "round.json").write_text(
                json.dumps(checkpoint.record, indent=2, sort_keys=True, allow_nan=False),
                encoding="utf-8",
            )

    def load_checkpoint(self, round_number: int) -> Checkpoint:
        folder = self.checkpoint_dir(round_number)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no checkpoint for round {round_number}")
        return Checkpoint(
            round=round_number,
            adapter=load_adapter(folder / "adapter.safetensors"),
            server_state=load_safetensors((folder / SERVER_STATE_FILE).read_bytes()),
            record=self.read_round_record(round_number),
        )

    def read_round_record(self, round_number: int) -> dict[str, Any]:
        """The metrics record stored with a round's checkpoint."""
        return self.read_json(self.checkpoint_dir(round_number) / "round.json")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl as a whole (it is small), so it is never half-written."""
        # allow_nan=False: "NaN" and "Infinity" are not JSON; a reader would choke on them.
        text = "".join(
            json.dumps(record, sort_keys=True, allow_nan=False) + "\n" for record in records
        )
        write_text_atomic(self.metrics_path, text)

    def append_metrics(self, record: dict[str, Any]) -> None:
        self.write_metrics([*self.read_metrics(), record])

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")

    def read_json(self, path: Path) -> dict[str, Any]:
        return read_json_object(path)
