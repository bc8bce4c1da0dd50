"""Record-level DP-SGD for a site's local LoRA training.

Each step is the subsampled Gaussian mechanism that the accountant is told about, and nothing
else touches the data:

1. Poisson sampling: every example joins the batch independently with probability
   ``q = expected_batch_size / len(examples)``. A batch may be empty; that step still adds noise
   and still counts, because the accounting for Poisson subsampling assumes every step does.
2. Per-example gradients of the LoRA parameters (the base model is frozen), each of the
   example's own mean token loss, from per-example copies of the LoRA weights
   (:mod:`fedsilo.model.lora_forward`).
3. Each example's whole-adapter gradient is clipped to L2 norm ``max_grad_norm``:
   ``g_i * min(1, C / ||g_i||)``, so no record moves the sum by more than ``C``.
4. ``(sum_i clipped g_i + N(0, (noise_multiplier * C)^2 I)) / expected_batch_size``: the
   standard normalisation with Poisson sampling (the actual batch size would itself depend on
   the data).
5. FedProx's ``mu * (w - w_global)`` is added after the noise (see :func:`train_local_dp`),
   then the optimizer steps. The optimizer only post-processes the noisy gradient.

The steps run in the site's one local-training loop (:mod:`fedsilo.training.loop`), in its
compute precision: under bf16 the forward pass runs in bf16, but per-example gradients are
upcast to fp32 before they are clipped and summed, so the bound ``C`` and the accountant's
inputs are the same in either precision. A large expected batch is processed in micro-batches
of per-example gradients, so memory does not grow with it.

Per-example gradients come from autograd itself: each trained LoRA weight is broadcast into a
per-example leaf for the batch, so the backward pass leaves one gradient per example
(:class:`fedsilo.model.lora_forward.PerExampleLora`). Nothing hooks into the forward or
backward pass, so the decoder layers run compiled as in plain training where the model was
prepared for it (:mod:`fedsilo.training.compilation`). The tests check these gradients
against Opacus's per-sample hooks and against one backward pass per example. Clipping, noise
and normalisation are written out below so that the mechanism is visible in a few lines, the
noise comes from an explicit generator, and an empty batch (no forward pass) is an ordinary
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from fedsilo.data.batching import collate
from fedsilo.data.encode import Example
from fedsilo.model.adapters import AdapterState
from fedsilo.model.lora_forward import PerExampleLora, per_example_lora
from fedsilo.training.compilation import compiled_training
from fedsilo.training.device import CPU_DP_MICRO_BATCH, dp_micro_batch_size, model_device
from fedsilo.training.loop import (
    LocalTrainingResult,
    OptimizerName,
    StepOutcome,
    StepProgress,
    micro_batches,
    train_local,
)
from fedsilo.training.loss import labelled_token_losses
from fedsilo.training.precision import Precision, forward_in

# Examples whose per-example gradients are held at once on the CPU: bounds memory for large
# batches (a GPU holds more, fedsilo.training.device).
DEFAULT_MICRO_BATCH_SIZE = CPU_DP_MICRO_BATCH


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


@dataclass
class DpSgdGradient:
    """One DP-SGD step as the loop's gradient method (steps 1-4 of the module docstring).

    Per-example gradients are computed ``micro_batch_size`` examples at a time, upcast to
    fp32, clipped and summed in fp32, so memory is bounded whatever the expected batch size and
    the clipping bound holds exactly in either compute precision.
    """

    expected_batch_size: int
    sampling_rate: float
    max_grad_norm: float
    noise_multiplier: float
    noise_seed: int
    micro_batch_size: int = DEFAULT_MICRO_BATCH_SIZE
    _noise: torch.Generator = field(init=False, repr=False)
    _per_example: PerExampleLora | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._noise = torch.Generator().manual_seed(self.noise_seed)

    def batches(
        self, examples: Sequence[Example], *, steps: int, generator: np.random.Generator
    ) -> Iterator[list[Example]]:
        return poisson_batches(
            examples, sampling_rate=self.sampling_rate, steps=steps, generator=generator
        )

    def attached(self, model: nn.Module) -> AbstractContextManager[None]:
        return self._attached(model)

    @contextmanager
    def _attached(self, model: nn.Module) -> Iterator[None]:
        # Per-example copies of the trained LoRA weights, and compiled decoder layers where
        # the model was prepared for it (training.compilation).
        params = [param for param in model.parameters() if param.requires_grad]
        with per_example_lora(model, params) as per_example, compiled_training(model):
            self._per_example = per_example
            try:
                yield
            finally:
                self._per_example = None

    def set_gradients(
        self,
        model: nn.Module,
        batch: Sequence[Example],
        *,
        params: Sequence[nn.Parameter],
        pad_id: int,
        precision: Precision,
    ) -> StepOutcome:
        if self._per_example is None:
            raise RuntimeError("DP-SGD gradients are computed only inside attached(model)")
        sums = [torch.zeros_like(param, dtype=torch.float32) for param in params]
        example_losses: list[float] = []
        tokens = positions = padding = 0
        for piece in micro_batches(batch, size=self.micro_batch_size):
            clipped, piece_losses = clipped_per_example_gradients(
                model,
                piece,
                per_example=self._per_example,
                pad_id=pad_id,
                max_grad_norm=self.max_grad_norm,
                precision=precision,
            )
            for total, per_example in zip(sums, clipped, strict=True):
                total += per_example.sum(dim=0)
            example_losses += piece_losses.tolist()
            piece_tokens = sum(len(example.input_ids) for example in piece)
            piece_positions = len(piece) * max(len(example.input_ids) for example in piece)
            tokens += piece_tokens
            positions += piece_positions
            padding += piece_positions - piece_tokens
        _set_private_gradients(
            params,
            sums,
            noise_std=self.noise_multiplier * self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            generator=self._noise,
        )
        loss = float(np.mean(example_losses)) if example_losses else None
        return StepOutcome(loss=loss, tokens=tokens, positions=positions, padding=padding)


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
    micro_batch_size: int | None = None,
    on_step: Callable[[StepProgress], None] | None = None,
) -> DpTrainingResult:
    """Train the adapter from ``global_state`` with DP-SGD for ``steps`` steps; return the update.

    The steps are the mechanism described in the module docstring, run by the one local loop
    (:func:`fedsilo.training.loop.train_local`). FedProx's proximal term
    ``(mu / 2) * ||w - w_global||^2`` depends only on the current weights (themselves outputs
    of earlier private steps) and on the global adapter the coordinator sent, never on a
    record, so the loop adds its gradient ``mu * (w - w_global)`` after the noise: it needs no
    clipping and costs no privacy, and clipping it with the data would only distort it.

    ``seed`` drives both the batch sampling and the noise, and must be secret to the site (see
    the module docstring). The model is left as it was found apart from its adapter weights:
    the per-example weight copies are removed (also on error) and the training mode is
    restored. ``train_loss`` is the mean over non-empty steps of the batch's mean per-example
    loss, NaN if every step drew an empty batch. Arguments are validated first (ValueError
    naming the argument). ``micro_batch_size`` defaults to the model's device's
    (:func:`fedsilo.training.device.dp_micro_batch_size`).
    """
    if micro_batch_size is None:
        micro_batch_size = dp_micro_batch_size(model_device(model))
    _validate(
        examples,
        steps=steps,
        expected_batch_size=expected_batch_size,
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        proximal_mu=proximal_mu,
        micro_batch_size=micro_batch_size,
    )
    sampling_rate = expected_batch_size / len(examples)
    method = DpSgdGradient(
        expected_batch_size=expected_batch_size,
        sampling_rate=sampling_rate,
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        noise_seed=seed,
        micro_batch_size=micro_batch_size,
    )
    result = train_local(
        model,
        examples,
        method=method,
        global_state=global_state,
        steps=steps,
        learning_rate=learning_rate,
        proximal_mu=proximal_mu,
        pad_id=pad_id,
        seed=seed,
        optimizer=optimizer,
        on_step=on_step,
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


def clipped_per_example_gradients(
    model: nn.Module,
    batch_examples: Sequence[Example],
    *,
    per_example: PerExampleLora,
    pad_id: int,
    max_grad_norm: float,
    precision: Precision = "fp32",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example gradients of the trained LoRA weights for one non-empty batch, clipped.

    ``per_example`` comes from :func:`fedsilo.model.lora_forward.per_example_lora` on
    ``model``. Returns, for each of its parameters, an fp32 tensor of shape
    ``(len(batch_examples), *param.shape)`` whose rows are the examples' clipped gradients (the
    clipping is over the whole adapter: all parameters of one example together), and the
    examples' mean token losses. The forward pass runs in ``precision``; the gradients are
    fp32 before their norms are taken, so the bound holds exactly.
    """
    batch = collate(batch_examples, pad_id=pad_id)
    per_example.expand(len(batch_examples))
    with forward_in(model, precision):
        per_example_losses = labelled_token_losses(model, batch).per_example_mean()
    # Row i of each per-example weight only meets example i, so the gradient of the sum of
    # the examples' losses leaves each example's own gradient in its row.
    torch.autograd.backward(per_example_losses.sum())
    grads = per_example.gradients()
    return clip_per_example(grads, max_grad_norm=max_grad_norm), per_example_losses.detach()


def per_example_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each example's gradient norm over all tensors of ``grads`` together (row ``i`` of each)."""
    squared = torch.stack([grad.flatten(start_dim=1).pow(2).sum(dim=1) for grad in grads])
    return squared.sum(dim=0).sqrt()


def clip_per_example(grads: Sequence[torch.Tensor], *, max_grad_norm: float) -> list[torch.Tensor]:
    """Scale each example's gradient (row ``i`` of every tensor in ``grads``) to norm <= bound.

    The norm is over all tensors together. The factor is ``min(1, C / (norm + 1e-6))`` (as
    in Opacus): gradients already within the bound are left unchanged, never scaled up.
    """
    factors = (max_grad_norm / (per_example_norms(grads) + 1e-6)).clamp(max=1.0)
    return [grad * factors.view(-1, *([1] * (grad.dim() - 1))) for grad in grads]


def _set_private_gradients(
    params: Sequence[nn.Parameter],
    sums: Sequence[torch.Tensor],
    *,
    noise_std: float,
    expected_batch_size: int,
    generator: torch.Generator,
) -> None:
    """Set each ``param.grad`` to the noisy mean of the clipped gradients.

    The noise is drawn for every parameter at every step, empty batch or not, so the
    generator's stream (and the run) depends only on the seed and the shapes. It is drawn on
    the CPU (where the generator is) on every device, then moved to the parameter's.
    """
    with torch.no_grad():
        for param, total in zip(params, sums, strict=True):
            noise = torch.normal(
                0.0, noise_std, size=param.shape, generator=generator, dtype=param.dtype
            )
            param.grad = (total + noise.to(param.device)) / expected_batch_size


def _validate(
    examples: Sequence[Example],
    *,
    steps: int,
    expected_batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    noise_multiplier: float,
    proximal_mu: float,
    micro_batch_size: int,
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
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")


def _check_number(name: str, value: float, *, minimum: float, strict: bool) -> None:
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
