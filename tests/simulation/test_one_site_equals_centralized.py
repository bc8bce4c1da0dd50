"""A one-site federation is centralized training, step for step.

The site trains with the seed, learning rate and steps of each round's task; training the same
examples in one place with those settings must give the same adapter after every round, up to
float rounding. Anything else would be error added by the federated path itself (transport,
signing, aggregation, applying the update).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.data.encode import encode_records
from fedsilo.data.tasks import build_task
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.protocol.schedule import local_steps_for
from fedsilo.server.run_folder import RunFolder
from fedsilo.training.loop import train_plain

from .conftest import run_with_grid

ONE_SITE: dict[str, Any] = {
    "run": {"rounds": 3},
    "task": {"num_sites": 1, "examples_per_site": 10, "gold_size": 4},
    "strategy": {"name": "fedavg", "min_sites": 1},
}


@pytest.mark.parametrize(
    "train",
    [
        {"local_steps": 3},
        {"local_steps": None, "local_epochs": 1.5, "lr_schedule": "cosine", "warmup_rounds": 1},
    ],
    ids=["steps-constant", "epochs-cosine"],
)
def test_one_site_federation_reproduces_centralized_training(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path, train: dict[str, Any]
) -> None:
    config = make_config(**ONE_SITE, train=train)
    run_dir = tmp_path / "run"
    run_with_grid(config, run_dir)
    folder = RunFolder(run_dir)
    tasks = [
        entry.payload["task"]
        for entry in read_entries(folder.ledger_path)
        if entry.kind is EntryKind.TASK_SENT
    ]

    loaded = load_model_with_adapter(config)
    data = build_task(config.task, seed=config.run.seed)
    examples = encode_records(
        loaded.tokenizer,
        data.sites[0].records,
        system_prompt=data.system_prompt,
        max_length=config.train.max_length,
        source="centralized",
    )
    state = loaded.adapter_template
    assert all(torch.equal(state[n], folder.load_checkpoint(0).adapter[n]) for n in state)
    for round_number, task in enumerate(tasks, start=1):
        assert isinstance(task, dict)
        steps = local_steps_for(
            local_steps=config.train.local_steps or 0,
            local_epochs=config.train.local_epochs or 0.0,
            batch_size=config.train.batch_size,
            num_examples=len(examples),
        )
        result = train_plain(
            loaded.model,
            examples,
            global_state=state,
            steps=steps,
            batch_size=config.train.batch_size,
            learning_rate=float(task["learning_rate"]),  # type: ignore[arg-type]
            proximal_mu=0.0,
            max_grad_norm=config.train.max_grad_norm,
            pad_id=int(loaded.tokenizer.pad_token_id),
            seed=int(task["seed"]),  # type: ignore[arg-type]
        )
        state = {name: state[name] + result.delta[name] for name in state}

        federated = folder.load_checkpoint(round_number).adapter
        for name in state:
            torch.testing.assert_close(federated[name], state[name], rtol=0, atol=1e-6)
    assert len(tasks) == config.run.rounds


def test_round_tasks_carry_the_schedule_and_the_epochs(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    train = {"local_steps": None, "local_epochs": 0.5, "lr_schedule": "cosine", "warmup_rounds": 1}
    config = make_config(**ONE_SITE, train=train)
    run_dir = tmp_path / "run"

    run_with_grid(config, run_dir)

    tasks = [
        entry.payload["task"]
        for entry in read_entries(RunFolder(run_dir).ledger_path)
        if entry.kind is EntryKind.TASK_SENT
    ]
    rates = [task["learning_rate"] for task in tasks]  # type: ignore[index]
    assert rates == pytest.approx([0.005, 0.01, 0.005])  # warmup, peak, half-way down
    assert {(task["local_steps"], task["local_epochs"]) for task in tasks} == {(0, 0.5)}  # type: ignore[index]
    metrics = RunFolder(run_dir).read_metrics()
    last = metrics[-1]
    assert last["gold_count"] == len(build_task(config.task, seed=config.run.seed).gold)
    low, high = last["gold_category_accuracy_ci95"]
    assert low <= last["gold_category_accuracy"] <= high
    assert set(last["gold_parts"]) == {"unseen-code"}
