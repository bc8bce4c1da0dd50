"""Where a process trains and evaluates: the CPU (the default) or the first CUDA GPU.

The device is a property of the loaded model: :func:`fedsilo.client.site.load_model_with_adapter`
moves the model to the device ``train.device`` names, and the training loop, the loss, DP-SGD
and the gold evaluation move each batch to wherever the model's parameters are. Adapter states
(what a site sends, what the server aggregates, checkpoints) are CPU fp32 on every device
(:func:`fedsilo.model.adapters.get_adapter_state`).

Three things differ on a GPU: the number of examples per forward pass
(:func:`plain_micro_batch_size`, :func:`dp_micro_batch_size`) and the bf16 choice
(:mod:`fedsilo.training.precision`), both because a GPU is bound by kernel launches at small
sizes, and the attention kernel (:func:`attention_kernel`). Runs on a GPU are not
bit-reproducible; CPU runs are.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedsilo.config.schema import DeviceSetting
from fedsilo.model.base import CPU_ATTENTION, AttentionKernel

# Plain training on the CPU: a batch sorted by length is cut into pieces of at most this many
# examples, each packed into one row (fedsilo.data.packing); the gradient is the same as
# without the cut. Larger pieces share their prompt prefix more: on SmolLM2 with ICD-10
# batches of 16, one thread, 489 tokens/s in pieces of 4, 740 in pieces of 8, 896 in one.
CPU_PLAIN_MICRO_BATCH = 16
# A packed row holds at most this many positions (or one longer example): its attention
# scores grow with the square of its length.
CPU_PACKED_POSITIONS = 512
GPU_PACKED_POSITIONS = 4096
# DP-SGD holds this many examples' per-example gradients at once (bounds memory).
CPU_DP_MICRO_BATCH = 8
GPU_DP_MICRO_BATCH = 64
# Gold records scored or generated per batch by the quality benchmark on a GPU.
GPU_EVAL_BATCH = 128


class DeviceError(ValueError):
    """A device setting this machine cannot honour; the message names ``train.device``."""


def resolve_device(setting: DeviceSetting, *, cuda_available: bool | None = None) -> torch.device:
    """The torch device ``train.device = setting`` names on this machine.

    ``"cuda"`` where torch sees no CUDA GPU is refused (DeviceError naming the setting) rather
    than silently trained on the CPU. ``cuda_available`` defaults to this machine's answer
    (tests pass their own).
    """
    if setting == "cpu":
        return torch.device("cpu")
    if setting != "cuda":
        raise DeviceError(f"train.device must be 'cpu' or 'cuda', got {setting!r}")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not available:
        raise DeviceError(
            "train.device = 'cuda', but torch finds no CUDA GPU on this machine "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
            "use train.device = 'cpu'"
        )
    return torch.device("cuda")


def model_device(model: nn.Module) -> torch.device:
    """The device ``model``'s parameters are on (the CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def on_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` with every tensor on ``device`` (the same tensors where they already are)."""
    return {name: tensor.to(device) for name, tensor in batch.items()}


def plain_micro_batch_size(device: torch.device, batch_size: int) -> int:
    """Examples per forward pass in plain training: the whole batch on a GPU."""
    return CPU_PLAIN_MICRO_BATCH if device.type == "cpu" else max(1, batch_size)


def packed_positions(device: torch.device) -> int:
    """The most positions plain training packs into one row on ``device``."""
    return CPU_PACKED_POSITIONS if device.type == "cpu" else GPU_PACKED_POSITIONS


def dp_micro_batch_size(device: torch.device) -> int:
    """Examples whose per-example gradients DP-SGD holds at once on ``device``."""
    return CPU_DP_MICRO_BATCH if device.type == "cpu" else GPU_DP_MICRO_BATCH


def attention_kernel(device: torch.device) -> AttentionKernel:
    """The attention kernel a model computing on ``device`` is loaded with: the plain one on
    the CPU (faster at fedsilo's sequence lengths, see :data:`fedsilo.model.base.CPU_ATTENTION`),
    the fused one on a GPU."""
    return CPU_ATTENTION if device.type == "cpu" else "sdpa"
