"""Local-training throughput on SmolLM2: fedsilo's loop against the loops others run.

Every loop trains the same LoRA adapter (rank 8, all projections) of the same model on the
same encoded ICD-10 examples (about 60 tokens each, about 5 of them answer), batch 16, for the
same number of steps from the same initial adapter, one process per (loop, threads) so that
peak memory and thread count are its own:

- ``bare-fp32``: a hand-written torch + peft loop (forward with full logits, backward, AdamW);
- ``bare-bf16``: the same with the frozen base weights in bf16 under autocast;
- ``hf-trainer-bf16``: the Hugging Face ``Trainer`` with peft and ``bf16=True`` on the CPU (the
  loop FlowerTune's clients run through TRL), same batches size and optimizer;
  ``hf-trainer-fp32`` the same with ``bf16=False``, what a user picks on a CPU without native
  bf16, where autocast to bf16 is emulated and slower than fp32;
- ``fedsilo-plain`` and ``fedsilo-plain-fp32``: :func:`fedsilo.training.loop.train_plain` in
  the precision ``auto`` resolves to, and in fp32, compiled where ``compile = "auto"`` finds
  torch.compile working (each row records ``compiled`` and its untimed ``warmup_seconds``,
  which hold the compilation), and ``fedsilo-plain-eager``, the ``auto`` precision with
  ``compile = "off"`` (what compilation adds);
- ``fedsilo-dp``: record-level DP-SGD (:func:`fedsilo.privacy.dp_sgd.train_local_dp`, Poisson
  batches of expected size 16, clip 1, noise 1) in the ``auto`` precision, compiled as
  ``fedsilo-plain``.

Each process also measures its GEMM peak in its own precision and thread count (the product
the precision probe times), so achieved FLOP rates are read against the same machine at the
same moment. FLOPs counted: forward plus activation gradients, ``4 * P`` per position a
weight matrix is applied to (2 per multiply-add, forward and backward; the frozen weights get
no weight gradient), with ``P_body`` the decoder's matrix parameters applied to every
position the loop computes, padding included (fedsilo's plain loop packs each micro-batch and
computes the prompt prefix its examples share once, so it computes fewer positions than
the examples have tokens), and ``P_head`` the LM head's, applied to every position (full
logits) or only to labelled positions (fedsilo; counted as the timed tokens times the
dataset's share of labelled tokens, since the loop reports tokens, not targets). Attention
scores and the LoRA matrices are not counted (under 3% here). ``eval_loss`` is the mean
answer loss on 64 held-out examples after training: loops that trained equally well have
equal eval losses.

The bare loops and the ``Trainer`` run the attention kernel Hugging Face picks by default
(``sdpa``); fedsilo's loops run the one fedsilo loads on the CPU (``eager``, see
:data:`fedsilo.model.base.CPU_ATTENTION`). Each row records its ``attention``.

    python benchmarks/throughput.py [--steps 12] [--threads 1 2]

Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
LOOPS = (
    "bare-fp32",
    "bare-bf16",
    "hf-trainer-bf16",
    "hf-trainer-fp32",
    "fedsilo-plain-fp32",
    "fedsilo-plain-eager",
    "fedsilo-plain",
    "fedsilo-dp",
)
BATCH = 16
LEARNING_RATE = 1e-3
WARMUP_STEPS = 2


def _rss_mb() -> float:
    """Resident memory now (MB), from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def _setup(precision: str, attention: str, compile_setting: str = "auto") -> dict[str, Any]:
    from fedsilo.client.site import load_model_with_adapter
    from fedsilo.config import parse_config
    from fedsilo.data.encode import encode_records
    from fedsilo.data.tasks import build_task

    config = parse_config(
        {
            "model": {"base": "smollm2-135m-instruct"},
            "task": {"num_sites": 4, "examples_per_site": 512, "gold_size": 64},
            "train": {"max_length": 96, "precision": precision, "compile": compile_setting},
        },
        source="benchmark",
    )
    loaded = load_model_with_adapter(config)
    peft_model: Any = loaded.model  # a PeftModel; its base model holds the attention kernel
    peft_model.get_base_model().set_attn_implementation(attention)
    task = build_task(config.task, seed=0)
    records = [record for site in task.sites for record in site.records]
    examples = encode_records(
        loaded.tokenizer, records, system_prompt=task.system_prompt, max_length=96, source="sites"
    )
    held_out = encode_records(
        loaded.tokenizer, task.gold, system_prompt=task.system_prompt, max_length=96, source="gold"
    )
    return {"loaded": loaded, "examples": examples, "held_out": held_out}


def _parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(matrix parameters of the decoder body, of the LM head), frozen base only."""
    from fedsilo.training.loss import decoder_and_head

    decoder, head = decoder_and_head(model)
    body = sum(
        module.weight.numel()
        for name, module in decoder.named_modules()
        if isinstance(module, torch.nn.Linear) and "lora_" not in name
    )
    head_weight = getattr(head, "weight", None)
    return body, 0 if head_weight is None else int(head_weight.numel())


def _eval_loss(loaded: Any, examples: list[Any], precision: str) -> float:
    from fedsilo.data.batching import collate
    from fedsilo.training.loss import labelled_token_losses
    from fedsilo.training.precision import compute_in

    loaded.model.eval()
    losses = []
    pad_id = int(loaded.tokenizer.pad_token_id)
    with torch.no_grad(), compute_in(precision):  # type: ignore[arg-type]
        for start in range(0, len(examples), 16):
            batch = collate(examples[start : start + 16], pad_id=pad_id)
            losses += labelled_token_losses(loaded.model, batch).per_example_mean().tolist()
    return float(np.mean(losses))


class _Clock:
    """Step times after the warm-up steps, the tokens and positions they processed."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.marks: list[float] = []
        self.peak_rss_mb = 0.0

    def step(self) -> None:
        self.marks.append(time.perf_counter())
        self.peak_rss_mb = max(self.peak_rss_mb, _rss_mb())

    def seconds(self) -> float:
        return self.marks[-1] - self.marks[WARMUP_STEPS - 1]

    def warmup_seconds(self) -> float:
        """The untimed first steps (a compiled loop compiles in them)."""
        return self.marks[WARMUP_STEPS - 1] - self.started


def _bare(setup: dict[str, Any], steps: int, precision: str) -> dict[str, Any]:
    from fedsilo.data.batching import collate, count_positions, count_tokens, iterate_batches
    from fedsilo.training.precision import compute_in

    loaded, examples = setup["loaded"], setup["examples"]
    model = loaded.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    clock = _Clock()
    tokens = positions = targets = 0
    pad_id = int(loaded.tokenizer.pad_token_id)
    batches = iterate_batches(
        examples, batch_size=BATCH, steps=steps, generator=np.random.default_rng(0)
    )
    for step, chosen in enumerate(batches):
        batch = collate(chosen, pad_id=pad_id)
        with compute_in(precision):  # type: ignore[arg-type]
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step()
        if step >= WARMUP_STEPS:
            tokens += count_tokens(batch)
            positions += count_positions(batch)
            targets += count_positions(batch)  # full logits: the head runs everywhere
    return {"clock": clock, "tokens": tokens, "positions": positions, "head_rows": targets}


def _hf_trainer(setup: dict[str, Any], steps: int, bf16: bool) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fedsilo.data.batching import collate, count_positions, count_tokens

    loaded, examples = setup["loaded"], setup["examples"]
    pad_id = int(loaded.tokenizer.pad_token_id)
    clock = _Clock()
    seen = {"tokens": 0, "positions": 0, "batches": 0}

    def collator(features: list[Any]) -> dict[str, torch.Tensor]:
        batch = collate(features, pad_id=pad_id)
        if seen["batches"] >= WARMUP_STEPS:
            seen["tokens"] += count_tokens(batch)
            seen["positions"] += count_positions(batch)
        seen["batches"] += 1
        return batch

    class Timer(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.step()

    arguments = TrainingArguments(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "fedsilo-hf-trainer"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        bf16=bf16,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = Trainer(
        model=loaded.model,
        args=arguments,
        train_dataset=list(examples),
        data_collator=collator,
        callbacks=[Timer()],
    )
    trainer.train()
    # The batches the collator built after the warm-up ones, minus any prefetched extra.
    return {
        "clock": clock,
        "tokens": seen["tokens"],
        "positions": seen["positions"],
        "head_rows": seen["positions"],
    }


def _fedsilo(setup: dict[str, Any], steps: int, private: bool) -> dict[str, Any]:
    from fedsilo.privacy.dp_sgd import train_local_dp
    from fedsilo.training.loop import train_plain

    loaded, examples = setup["loaded"], setup["examples"]
    clock = _Clock()
    progress: list[Any] = []

    def on_step(state: Any) -> None:
        clock.step()
        progress.append(state)

    common: dict[str, Any] = {
        "global_state": loaded.adapter_template,
        "steps": steps,
        "learning_rate": LEARNING_RATE,
        "proximal_mu": 0.0,
        "pad_id": int(loaded.tokenizer.pad_token_id),
        "seed": 0,
        "on_step": on_step,
    }
    if private:
        result = train_local_dp(
            loaded.model,
            examples,
            expected_batch_size=BATCH,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            **common,
        ).result
    else:
        result = train_plain(loaded.model, examples, batch_size=BATCH, max_grad_norm=1.0, **common)
    tokens = result.tokens - progress[WARMUP_STEPS - 1].tokens
    positions = result.positions - progress[WARMUP_STEPS - 1].positions
    targets = round(
        tokens * sum(e.num_targets for e in examples) / sum(len(e.input_ids) for e in examples)
    )
    return {
        "clock": clock,
        "tokens": tokens,
        "positions": positions,
        "head_rows": targets,
        "padding_share": result.padding_share,
    }


def run_one(loop: str, threads: int, steps: int) -> dict[str, Any]:
    """Measure one loop in this process (called in a child process per loop)."""
    from fedsilo.training.precision import matmul_gflops, resolve_precision

    torch.set_num_threads(threads)
    auto = resolve_precision("auto").precision
    precision = {
        "bare-fp32": "fp32",
        "bare-bf16": "bf16",
        "hf-trainer-bf16": "fp32",  # the Trainer keeps fp32 weights and autocasts
        "hf-trainer-fp32": "fp32",
        "fedsilo-plain-fp32": "fp32",
        "fedsilo-plain-eager": auto,
        "fedsilo-plain": auto,
        "fedsilo-dp": auto,
    }[loop]
    from fedsilo.model.base import CPU_ATTENTION

    attention = CPU_ATTENTION if loop.startswith("fedsilo") else "sdpa"
    # Where a site's memory goes: the runtime (torch, transformers, peft imported), then the
    # model and the encoded data, then what training adds on top.
    rss_before_load = _rss_mb()
    setup = _setup(precision, attention, "off" if loop == "fedsilo-plain-eager" else "auto")
    rss_after_load = _rss_mb()
    compute = "bf16" if loop in ("bare-bf16", "hf-trainer-bf16") else precision
    peak = matmul_gflops(torch.bfloat16 if compute == "bf16" else torch.float32, seconds=1.0)
    if loop.startswith("bare"):
        measured = _bare(setup, steps, compute)
    elif loop.startswith("hf-trainer"):
        measured = _hf_trainer(setup, steps, bf16=loop == "hf-trainer-bf16")
    else:
        measured = _fedsilo(setup, steps, private=loop == "fedsilo-dp")
    clock: _Clock = measured["clock"]
    seconds = clock.seconds()
    body, head = _parameter_counts(setup["loaded"].model)
    flops = 4.0 * (body * measured["positions"] + head * measured["head_rows"])
    return {
        "loop": loop,
        "threads": threads,
        "precision": compute,
        "attention": attention,
        # fedsilo's loops run the decoder layers through torch.compile where the machine
        # can (fedsilo.training.compilation), except the one set "off"; the others run eager.
        "compiled": loop in ("fedsilo-plain", "fedsilo-plain-fp32", "fedsilo-dp")
        and setup["loaded"].compiled.enabled,
        "steps_timed": steps - WARMUP_STEPS,
        "warmup_seconds": clock.warmup_seconds(),
        "seconds": seconds,
        "tokens": measured["tokens"],
        "positions": measured["positions"],
        "padding_share": measured.get(
            "padding_share", 1.0 - measured["tokens"] / measured["positions"]
        ),
        "tokens_per_s": measured["tokens"] / seconds,
        "achieved_gflops": flops / seconds / 1e9,
        "gemm_peak_gflops": peak,
        "share_of_peak": flops / seconds / 1e9 / peak,
        "eval_loss": _eval_loss(setup["loaded"], setup["held_out"], compute),
        "rss_before_load_mb": rss_before_load,
        "rss_after_load_mb": rss_after_load,
        "peak_rss_training_mb": clock.peak_rss_mb,
        "peak_rss_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        "param_counts": {"body": body, "head": head},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loops", nargs="+", default=list(LOOPS), choices=LOOPS)
    parser.add_argument("--one", choices=LOOPS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.threads[0], args.steps)))
        return

    from fedsilo.training.precision import (
        NATIVE_BF16_FLAGS,
        cpu_flags,
        cpu_model,
        has_native_bf16,
        matmul_gflops,
    )

    # Both precisions' GEMM rate on one thread, in this parent process before any loop runs:
    # where bf16 is emulated it is slower than fp32 by an order of magnitude or more, which is
    # why the bf16 loops may be left out on such a CPU (--loops).
    torch.set_num_threads(1)
    gemm_one_thread = {
        "fp32": matmul_gflops(torch.float32, seconds=1.0),
        "bf16": matmul_gflops(torch.bfloat16, seconds=1.0),
    }
    rows = []
    for threads in args.threads:
        for loop in args.loops:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            command = [sys.executable, __file__, "--one", loop, "--threads", str(threads)]
            done = subprocess.run(
                [*command, "--steps", str(args.steps)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("loop", "threads", "tokens_per_s")}))
            result = {
                "benchmark": "local-training-throughput",
                "model": "smollm2-135m-instruct",
                "batch_size": BATCH,
                "steps": args.steps,
                "warmup_steps": WARMUP_STEPS,
                "native_bf16": has_native_bf16(cpu_flags()),
                # Sessions land on different CPUs (AMX, AVX-512 BF16 or neither): ratios and
                # shares of peak are comparable only between runs on the same one.
                "cpu_model": cpu_model(),
                "bf16_flags": sorted(cpu_flags() & set(NATIVE_BF16_FLAGS)),
                "gemm_gflops_one_thread": gemm_one_thread,
                "rows": rows,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "torch": torch.__version__,
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
