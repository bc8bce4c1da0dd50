"""Record-level DP-SGD for a site's local LoRA training.

Each step is the subsampled Gaussian mechanism that the accountant is told about, and nothing
else touches the data:

1. Poisson sampling: every example joins the batch independently with probability
   ``q = expected_batch_size / len(examples)``. A batch may be empty; that step still adds noise
   and still counts, because the accounting for Poisson subsampling assumes every step does.
2. Per-example gradients of the LoRA parameters (the base model is frozen), each of the
   example's own mean token loss, from Opacus's per-sample gradient hooks.
3. Each example's whole-adapter gradient is clipped to L2 norm ``max_grad_norm``:
   ``g_i * min(1, C / ||g_i||)``, so no record moves the sum by more than ``C``.
4. ``(sum_i clipped g_i + N(0, (noise_multiplier * C)^2 I)) / expected_batch_size``: the
   standard normalisation with Poisson sampling (the actual batch size would itself depend on
   the data).
5. FedProx's ``mu * (w - w_global)`` is added after the noise (see :func:`train_local_dp`),
   then the optimizer steps. The optimizer only post-processes the noisy gradient.

Opacus provides the per-example gradients only. Clipping, noise and normalisation are written
out below rather than delegated to ``opacus.optimizers.DPOptimizer`` so that the mechanism is
visible in a few lines, the noise comes from an explicit generator, and an empty batch (which
has no forward pass, hence no per-sample gradients for DPOptimizer to read) is an ordinary
noise-only step.

Randomness: batches come from ``numpy.random.default_rng(seed)`` and noise from a
``torch.Generator`` seeded with ``seed``; the global RNGs are not used, so a run is
reproducible. Both generators are deterministic, so the guarantee holds only against parties
that do not know ``seed``: whoever knows it can recompute the batches and subtract the noise.
The seed must be a secret of the site (for instance drawn with :mod:`secrets`), never a value
the coordinator chose or can see. Noise is drawn in floating point with ``torch.normal``; no
defence against floating-point attacks on the Gaussian sampler is attempted.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from opacus.grad_sample import GradSampleHooks
from peft import PeftModel
from torch import nn

from fedsilo.client.train import LocalTrainingResult
from fedsilo.data.batching import collate
from fedsilo.data.encode import IGNORE_INDEX, Example
from fedsilo.model.adapters import AdapterState, get_adapter_state, set_adapter_state

OptimizerName = Literal["adamw", "sgd"]
"""The optimizer that turns noisy gradients into steps (post-processing, free in privacy)."""

_OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float], torch.optim.Optimizer]] = {
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
}

# Attributes that Opacus's hooks leave on modules after a backward pass.
_MODULE_LEFTOVERS = ("activations", "max_batch_len")


@dataclass(frozen=True)
class DpTrainingResult:
    """A DP-SGD local round: the training result and the mechanism it ran.

    ``sampling_rate``, ``steps``, ``noise_multiplier`` and ``max_grad_norm`` are exactly what
    an accountant needs: ``steps`` compositions of a Poisson-subsampled Gaussian mechanism with
    sampling rate ``sampling_rate`` and noise standard deviation ``noise_multiplier`` times the
    sensitivity ``max_grad_norm``. Only ``result.delta`` is covered by that guarantee;
    ``result.train_loss`` and ``result.tokens`` are computed from the raw records and are not
    noised, and ``result.num_examples`` is the size of the dataset.
    """

    result: LocalTrainingResult
    sampling_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float


def train_local_dp(
    model: PeftModel,
    examples: Sequence[Example],
    *,
    global_state: AdapterState,
    steps: int,
    expected_batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    noise_multiplier: float,
    proximal_mu: float,
    pad_id: int,
    seed: int,
    optimizer: OptimizerName = "adamw",
) -> DpTrainingResult:
    """Train the adapter from ``global_state`` with DP-SGD for ``steps`` steps; return the update.

    The steps are the mechanism described in the module docstring. FedProx's proximal term
    ``(mu / 2) * ||w - w_global||^2`` depends only on the current weights (themselves outputs
    of earlier private steps) and on the global adapter the coordinator sent, never on a
    record, so its gradient ``mu * (w - w_global)`` is added after the noise: it needs no
    clipping and costs no privacy, and clipping it with the data would only distort it.

    ``seed`` drives both the batch sampling and the noise, and must be secret to the site (see
    the module docstring). The model is left as it was found apart from its adapter weights:
    the Opacus hooks and their attributes are removed (also on error) and the training mode is
    restored. ``train_loss`` is the mean over non-empty steps of the batch's mean per-example
    loss, NaN if every step drew an empty batch. Arguments are validated first (ValueError
    naming the argument).
    """
    _validate(
        examples,
        steps=steps,
        expected_batch_size=expected_batch_size,
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        proximal_mu=proximal_mu,
        optimizer=optimizer,
    )
    started = time.perf_counter()
    sampling_rate = expected_batch_size / len(examples)
    set_adapter_state(model, global_state)
    params = [param for param in model.parameters() if param.requires_grad]
    if not params:
        raise ValueError("the model has no trainable adapter parameters")
    anchors = [param.detach().clone() for param in params]
    # A fresh optimizer each round, as in non-private training.
    step_optimizer = _OPTIMIZERS[optimizer](params, learning_rate)
    sampler = np.random.default_rng(seed)
    noise_generator = torch.Generator(device=params[0].device).manual_seed(seed)

    losses: list[float] = []
    tokens = 0
    was_training = model.training
    try:
        with per_example_gradient_hooks(model):
            model.train()
            for batch_examples in poisson_batches(
                examples, sampling_rate=sampling_rate, steps=steps, generator=sampler
            ):
                if batch_examples:
                    clipped, batch_losses = clipped_per_example_gradients(
                        model,
                        batch_examples,
                        params=params,
                        pad_id=pad_id,
                        max_grad_norm=max_grad_norm,
                    )
                    summed = [per_example.sum(dim=0) for per_example in clipped]
                    losses.append(float(batch_losses.mean()))
                    tokens += sum(len(example.input_ids) for example in batch_examples)
                else:
                    summed = [torch.zeros_like(param) for param in params]
                _set_private_gradients(
                    params,
                    summed,
                    anchors,
                    noise_std=noise_multiplier * max_grad_norm,
                    expected_batch_size=expected_batch_size,
                    proximal_mu=proximal_mu,
                    generator=noise_generator,
                )
                step_optimizer.step()
                step_optimizer.zero_grad(set_to_none=True)
    finally:
        for param in params:
            param.grad = None
        model.train(was_training)

    trained = get_adapter_state(model)
    delta = {name: trained[name] - global_state[name] for name in global_state}
    result = LocalTrainingResult(
        delta=delta,
        num_examples=len(examples),
        train_loss=float(np.mean(losses)) if losses else math.nan,
        tokens=tokens,
        seconds=time.perf_counter() - started,
    )
    return DpTrainingResult(
        result=result,
        sampling_rate=sampling_rate,
        steps=steps,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
    )


def poisson_batches(
    examples: Sequence[Example],
    *,
    sampling_rate: float,
    steps: int,
    generator: np.random.Generator,
) -> Iterator[list[Example]]:
    """Yield ``steps`` batches, each holding every example independently with ``sampling_rate``.

    Batches may be empty and vary in size (binomial, mean ``sampling_rate * len(examples)``).
    Examples keep their dataset order within a batch. The same generator state gives the same
    batches.
    """
    if not 0.0 <= sampling_rate <= 1.0:
        raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate}")
    for _ in range(steps):
        chosen = np.flatnonzero(generator.random(len(examples)) < sampling_rate)
        yield [examples[int(index)] for index in chosen]


@contextmanager
def per_example_gradient_hooks(model: nn.Module) -> Iterator[None]:
    """Attach Opacus's per-sample gradient hooks to ``model``'s trainable layers, then remove them.

    While attached, a backward pass of a loss that is a *sum* of per-example losses leaves
    each trainable parameter's per-example gradients in ``param.grad_sample`` (batch first).
    On exit the hooks and every attribute they added to parameters and modules are removed,
    even if the body raised.
    """
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        yield
    finally:
        hooks.cleanup()
        for module in model.modules():
            for name in _MODULE_LEFTOVERS:
                if name in module.__dict__:
                    delattr(module, name)


def clipped_per_example_gradients(
    model: PeftModel,
    batch_examples: Sequence[Example],
    *,
    params: Sequence[nn.Parameter],
    pad_id: int,
    max_grad_norm: float,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example gradients of ``params`` for one non-empty batch, each clipped to the bound.

    Needs :func:`per_example_gradient_hooks` attached and the model in training mode. Returns,
    for each parameter, a tensor of shape ``(len(batch_examples), *param.shape)`` whose rows are
    the examples' clipped gradients (the clipping is over the whole adapter: all parameters of
    one example together), and the examples' mean token losses. ``param.grad`` is left as
    whatever the backward pass put there; callers overwrite it.
    """
    batch = collate(batch_examples, pad_id=pad_id)
    per_example_losses = _per_example_losses(model, batch)
    # Opacus's hooks assume the loss is a sum over examples: each grad_sample row is then
    # the gradient of that example's own loss.
    with warnings.catch_warnings():
        # The first adapted layers take inputs that need no gradient (the base is frozen);
        # torch warns that the hook then sees output gradients only, which is all it needs.
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )
        torch.autograd.backward(per_example_losses.sum())
    grads = [_take_grad_sample(param) for param in params]
    return clip_per_example(grads, max_grad_norm=max_grad_norm), per_example_losses.detach()


def clip_per_example(grads: Sequence[torch.Tensor], *, max_grad_norm: float) -> list[torch.Tensor]:
    """Scale each example's gradient (row ``i`` of every tensor in ``grads``) to norm <= bound.

    The norm is over all tensors together. The factor is ``min(1, C / (norm + 1e-6))`` (as
    in Opacus): gradients already within the bound are left unchanged, never scaled up.
    """
    squared = torch.stack([grad.flatten(start_dim=1).pow(2).sum(dim=1) for grad in grads])
    norms = squared.sum(dim=0).sqrt()
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return [grad * factors.view(-1, *([1] * (grad.dim() - 1))) for grad in grads]


def _set_private_gradients(
    params: Sequence[nn.Parameter],
    sums: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    *,
    noise_std: float,
    expected_batch_size: int,
    proximal_mu: float,
    generator: torch.Generator,
) -> None:
    """Set each ``param.grad`` to the noisy mean of the clipped gradients, plus FedProx's pull.

    The noise is drawn for every parameter at every step, empty batch or not, so the
    generator's stream (and the run) depends only on the seed and the shapes.
    """
    with torch.no_grad():
        for param, total, anchor in zip(params, sums, anchors, strict=True):
            noise = torch.normal(
                0.0,
                noise_std,
                size=param.shape,
                generator=generator,
                device=param.device,
                dtype=param.dtype,
            )
            grad = (total + noise) / expected_batch_size
            if proximal_mu > 0:
                # Data-independent, so added after the noise (see train_local_dp).
                grad = grad + proximal_mu * (param - anchor)
            param.grad = grad


def _per_example_losses(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's mean token loss (a causal LM predicts position t from positions before t)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    token_losses = nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return token_losses.sum(dim=1) / counts


def _take_grad_sample(param: nn.Parameter) -> torch.Tensor:
    """The per-example gradients Opacus stored on ``param``; cleared for the next batch."""
    grad_sample = getattr(param, "grad_sample", None)
    if not isinstance(grad_sample, torch.Tensor):
        # None: the parameter got no gradient; a list: two forward passes were accumulated.
        raise RuntimeError(
            f"no single per-example gradient for a parameter of shape {tuple(param.shape)}: "
            f"got {type(grad_sample).__name__}"
        )
    param.grad_sample = None  # type: ignore[attr-defined]  # an attribute Opacus adds
    return grad_sample


def _validate(
    examples: Sequence[Example],
    *,
    steps: int,
    expected_batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    noise_multiplier: float,
    proximal_mu: float,
    optimizer: str,
) -> None:
    if not examples:
        raise ValueError("a site cannot train on an empty dataset")
    empty = [index for index, example in enumerate(examples) if example.num_targets == 0]
    if empty:
        raise ValueError(f"examples {empty[:5]} have no loss token; a mean loss needs one")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 1 <= expected_batch_size <= len(examples):
        raise ValueError(
            f"expected_batch_size must be between 1 and the number of examples "
            f"({len(examples)}), got {expected_batch_size}"
        )
    _check_number("learning_rate", learning_rate, minimum=0.0, strict=True)
    _check_number("max_grad_norm", max_grad_norm, minimum=0.0, strict=True)
    _check_number("noise_multiplier", noise_multiplier, minimum=0.0, strict=False)
    _check_number("proximal_mu", proximal_mu, minimum=0.0, strict=False)
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")


def _check_number(name: str, value: float, *, minimum: float, strict: bool) -> None:
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
