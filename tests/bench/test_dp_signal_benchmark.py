"""benchmarks/dp_signal.py: per-example gradient figures against plain autograd, and its noise."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedsilo.bench.dp_recipe import SMOKE_RECIPE
from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.data.batching import collate
from fedsilo.data.encode import encode_records
from fedsilo.data.tasks import build_task
from fedsilo.privacy.calibration import calibrate_noise_multiplier
from fedsilo.training.loss import labelled_token_losses

from . import benchmark_script


def test_gradient_figures_match_one_backward_pass_per_example(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    config = make_config()
    loaded = load_model_with_adapter(config)
    task = build_task(config.task, seed=0)
    examples = encode_records(
        loaded.tokenizer,
        list(task.sites[0].records[:5]),
        system_prompt=task.system_prompt,
        max_length=96,
        source="test",
    )
    clip = 0.05

    figures = benchmark_script("dp_signal").gradient_point(loaded, examples, clip=clip)

    model = loaded.model
    params = [param for param in model.parameters() if param.requires_grad]
    model.train(True)
    rows = []
    for example in examples:
        batch = collate([example], pad_id=int(loaded.tokenizer.pad_token_id))
        loss = labelled_token_losses(model, batch).per_example_mean().sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    grads = torch.stack(rows)
    norms = grads.norm(dim=1)
    clipped = grads * (clip / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)
    assert figures["records"] == 5
    assert figures["per_example_norm"]["median"] == pytest.approx(float(norms.median()), rel=1e-4)
    assert figures["per_example_norm"]["mean"] == pytest.approx(float(norms.mean()), rel=1e-4)
    assert figures["share_clipped"] == pytest.approx(float((norms > clip).float().mean()))
    assert figures["mean_gradient_norm"] == pytest.approx(float(grads.mean(0).norm()), rel=1e-4)
    assert figures["mean_clipped_gradient_norm"] == pytest.approx(
        float(clipped.mean(0).norm()), rel=1e-4
    )
    assert figures["mean_clipped_gradient_norm"] <= clip


def test_smoke_run_writes_the_noise_each_site_calibrates(tmp_path: Path) -> None:
    out = tmp_path / "dp-signal.json"

    benchmark_script("dp_signal").main(["--smoke", "--epsilons", "1,8", "--out", str(out)])

    result = json.loads(out.read_text())
    recipe = SMOKE_RECIPE
    assert result["recipe"] == recipe.to_json()
    steps = result["noise"][0]["steps"]
    # docs/tasks.md: a site trains ceil(local_epochs * ceil(records / batch)) steps a round.
    batches_per_epoch = math.ceil(result["records_per_site"] / recipe.expected_batch_size)
    assert steps == recipe.rounds * math.ceil(recipe.local_epochs * batches_per_epoch)
    for row in result["noise"]:
        expected = calibrate_noise_multiplier(
            target_epsilon=row["epsilon"],
            delta=recipe.delta,
            sampling_rate=recipe.expected_batch_size / result["records_per_site"],
            steps=steps,
        )
        assert row["noise_multiplier"] == expected
        assert row["noise_norm"] == pytest.approx(
            expected
            * recipe.max_grad_norm
            / recipe.expected_batch_size
            * math.sqrt(result["trained_parameters"])
        )
    # A larger epsilon needs less noise.
    assert result["noise"][0]["noise_multiplier"] > result["noise"][1]["noise_multiplier"]
    signal = result["points"][0]["mean_clipped_gradient_norm"]
    assert 0 < signal <= recipe.max_grad_norm
    for ratio, row in zip(result["signal_to_noise"], result["noise"], strict=True):
        assert ratio["signal_to_noise"] == pytest.approx(signal / row["noise_norm"])

    # The benchmark page shows every results file, each under its adapter and with its source.
    other = {**result, "recipe": {**result["recipe"], "lora_rank": 1, "lora_targets": ["q_proj"]}}
    page = "\n".join(
        benchmark_script("report_privacy").signal_section(
            {"dp-signal.json": result, "dp-signal-r1.json": other}
        )
    )
    assert "### `dp-signal-r1.json`: LoRA rank 1 on q_proj, expected batch" in page
    assert "source: `benchmarks/results/dp-signal-r1.json`" in page
    assert "source: `benchmarks/results/dp-signal.json`" in page


def test_default_flags_measure_the_privacy_utility_recipe_and_flags_change_it() -> None:
    import argparse

    from fedsilo.bench.dp_recipe import DpRecipe, add_schedule_arguments, schedule_from

    parser = argparse.ArgumentParser()
    add_schedule_arguments(parser)
    assert schedule_from(parser.parse_args([]), DpRecipe(expected_batch_size=32)) == DpRecipe()
    changed = schedule_from(
        parser.parse_args(["--lora-rank", "2", "--lora-targets", "q_proj,v_proj"]), DpRecipe()
    )
    assert (changed.lora_rank, changed.lora_targets) == (2, ("q_proj", "v_proj"))


def test_smoke_refuses_recipe_flags_it_would_ignore(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="leave out the recipe flags"):
        benchmark_script("dp_signal").main(
            ["--smoke", "--lora-rank", "2", "--out", str(tmp_path / "x.json")]
        )
