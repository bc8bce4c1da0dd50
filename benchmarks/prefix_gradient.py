"""How much of a record's LoRA gradient flows through the prompt prefix all records share.

fedsilo's plain loop packs a micro-batch so that the prompt prefix its examples share (chat
template, system prompt, start of the user turn: 37 of about 60 tokens for ICD-10 coding) is
computed once. DP-SGD cannot: each record's clipped gradient must include what flows back
through its own copy of the prefix, so it computes the prefix for every record, which is why
it takes about 2.2-2.4x plain's time per token at the same GFLOP/s
(``benchmarks/results/throughput*.json``). Sharing the prefix under DP would mean dropping
that path: the prefix's keys and values computed once without gradient, each record
differentiating only through its own suffix. The forward pass, and so the loss, would be the
same; the gradient would not. This measures by how much, on SmolLM2 after some plain
training (LoRA's B starts at zero, where the prefix path carries nothing):

- ``cosine``: between each record's exact gradient and the gradient with the prefix path
  cut, over all LoRA weights (1 = the cut loses nothing);
- ``norm_ratio``: the cut gradient's norm over the exact one's;
- ``clipped_sum_cosine``: between the sums of the records' gradients clipped to ``clip``, what
  a DP-SGD step adds noise to;
- ``prefix_share``: the share of the records' tokens that is shared prefix.

    python benchmarks/prefix_gradient.py [--steps 20] [--records 32]

Writes benchmarks/results/prefix-gradient.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from throughput import BATCH, LEARNING_RATE, _setup

RESULTS = Path(__file__).parent / "results"
CLIP = 1.0


def _gradient(model: Any, example: Any, *, prefix: int, cut: bool) -> tuple[torch.Tensor, float]:
    """One record's gradient of its mean answer loss over the trained weights, and the loss;
    with ``cut`` the first ``prefix`` positions run without gradient and are attended to from
    the key-value cache."""
    from fedsilo.data.encode import IGNORE_INDEX
    from fedsilo.training.loss import decoder_and_head

    decoder, head = decoder_and_head(model)
    params = [param for param in model.parameters() if param.requires_grad]
    ids = torch.tensor([example.input_ids])
    model.zero_grad()
    if cut:
        with torch.no_grad():
            cache = decoder(input_ids=ids[:, :prefix], use_cache=True).cache
        suffix = decoder(input_ids=ids[:, prefix:], cache=cache, use_cache=True)
        hidden = suffix.last_hidden_state
        offset = prefix
    else:
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        offset = 0
    # Position t predicts the label at t + 1; every labelled position lies after the prefix.
    targets = torch.tensor([example.labels])[:, offset + 1 :]
    scored = targets != IGNORE_INDEX
    logits = head(hidden[:, : targets.shape[1]][scored]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[scored])
    torch.autograd.backward(loss)
    grad = torch.cat([param.grad.flatten() for param in params if param.grad is not None])
    return grad.clone(), float(loss.detach())


def _clipped_sum(grads: torch.Tensor) -> torch.Tensor:
    factors = (CLIP / (grads.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    clipped: torch.Tensor = (grads * factors).sum(dim=0)
    return clipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="plain training steps first")
    parser.add_argument("--records", type=int, default=32, help="records whose gradients compare")
    parser.add_argument("--out", type=Path, default=RESULTS / "prefix-gradient.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from fedsilo.data.packing import shared_prefix_length
    from fedsilo.model.adapters import get_adapter_state
    from fedsilo.training.loop import train_plain
    from fedsilo.training.precision import cpu_model

    setup = _setup("fp32", "eager", "off")
    model, examples = setup["loaded"].model, setup["examples"]
    train, compared = examples[: -args.records], examples[-args.records :]
    started = time.perf_counter()
    train_plain(
        model,
        train,
        global_state=get_adapter_state(model),
        steps=args.steps,
        batch_size=BATCH,
        learning_rate=LEARNING_RATE,
        proximal_mu=0.0,
        max_grad_norm=None,
        pad_id=int(setup["loaded"].tokenizer.pad_token_id),
        seed=0,
    )
    train_seconds = time.perf_counter() - started
    prefix = shared_prefix_length(compared)
    exact, cut = [], []
    for example in compared:
        grad, loss = _gradient(model, example, prefix=prefix, cut=False)
        cut_grad, cut_loss = _gradient(model, example, prefix=prefix, cut=True)
        # The forward pass is the same function either way: only the gradient may differ.
        if abs(loss - cut_loss) > 1e-4 * max(1.0, abs(loss)):
            raise SystemExit(f"losses differ with the prefix cut: {loss} against {cut_loss}")
        exact.append(grad)
        cut.append(cut_grad)
    exact_grads, cut_grads = torch.stack(exact), torch.stack(cut)
    cosine = torch.nn.functional.cosine_similarity(exact_grads, cut_grads, dim=1)
    norm_ratio = cut_grads.norm(dim=1) / exact_grads.norm(dim=1)
    clipped = torch.nn.functional.cosine_similarity(
        _clipped_sum(exact_grads), _clipped_sum(cut_grads), dim=0
    )
    tokens = sum(len(example.input_ids) for example in compared)
    lora = model.peft_config[model.active_adapter]
    result = {
        "benchmark": "prefix-gradient",
        "model": "smollm2-135m-instruct",
        "lora": {"rank": lora.r, "target_modules": sorted(lora.target_modules)},
        "plain_steps_first": args.steps,
        "batch_size": BATCH,
        "learning_rate": LEARNING_RATE,
        "records": len(compared),
        "prefix_tokens": prefix,
        "prefix_share": prefix * len(compared) / tokens,
        "cosine": {"mean": float(cosine.mean()), "min": float(cosine.min())},
        "norm_ratio": {"mean": float(norm_ratio.mean()), "min": float(norm_ratio.min())},
        "clip": CLIP,
        "clipped_sum_cosine": float(clipped),
        "train_seconds": train_seconds,
        "cpu_model": cpu_model(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
