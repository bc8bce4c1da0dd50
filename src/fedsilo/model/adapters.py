"""LoRA adapters: attaching them, reading and writing their tensors, and exporting them.

Only adapter tensors ever leave a site or get saved. An adapter state is a plain dict of fp32
CPU tensors keyed by peft's state-dict names (``get_peft_model_state_dict``, adapter name
removed), so it can be averaged, masked, noised and serialized without touching the model.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn
from transformers import PreTrainedModel

from fedsilo.model.base import ModelError
from fedsilo.model.lora_forward import use_rank_scaled_forward
from fedsilo.storage import atomic_folder, write_bytes_atomic

AdapterState: TypeAlias = dict[str, torch.Tensor]
"""LoRA tensors by peft state-dict name: fp32, CPU, contiguous, detached."""

_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def attach_lora(
    model: PreTrainedModel,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    init_seed: int,
    freeze_a: bool = False,
) -> PeftModel:
    """Wrap ``model`` (in place) with a LoRA adapter on ``target_modules``.

    Each LoRA A matrix is drawn with peft's default rule (Kaiming-uniform, ``a=sqrt(5)``) from
    a generator seeded with ``init_seed``, in sorted parameter-name order, and each B is zero:
    every site and the server that use the same seed and shapes start from the same adapter.
    The global torch RNG is left as it was. Only LoRA parameters are trainable.

    ``freeze_a`` gives FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving
    Federated Learning"): the A matrices stay at their seeded values and only B is trained.
    Frozen tensors are not part of the adapter state (:func:`get_adapter_state`), so they are
    never sent or averaged: every party rebuilds them from the shared seed. With A shared,
    averaging the B matrices averages the weight updates ``B @ A`` exactly.
    """
    targets = list(target_modules)
    available = _linear_module_names(model)
    unknown = sorted(set(targets) - available)
    if not targets or unknown:
        raise ModelError(
            f"LoRA target_modules {unknown or targets} do not name linear layers of "
            f"{type(model).__name__}; its linear modules are: {', '.join(sorted(available))}"
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # annotated int; only used in alpha / r
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    # peft draws its own init from the global RNG; keep that draw private, then replace it
    # with one that depends on init_seed alone.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 reads a transformers attribute renamed in v5; nothing here to act on.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        peft_model = get_peft_model(model, config)
    if not isinstance(peft_model, PeftModel):
        raise ModelError(f"peft did not return a PeftModel for {type(model).__name__}")
    _init_lora(peft_model, init_seed)
    use_rank_scaled_forward(peft_model)
    if freeze_a:
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return peft_model


def get_adapter_state(model: PeftModel) -> AdapterState:
    """A detached fp32 CPU copy of the model's trainable LoRA tensors, sorted by name.

    Frozen LoRA tensors (FFA-LoRA's A matrices) are left out: they are a function of the
    shared init seed, not of any site's data, and never travel.
    """
    trainable = _trainable_parameters(model)
    state = get_peft_model_state_dict(model)
    return {
        name: tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        for name, tensor in sorted(state.items())
        if name in trainable
    }


def set_adapter_state(model: PeftModel, state: AdapterState) -> None:
    """Copy ``state`` into the model's LoRA parameters, in place.

    Strict: the names and shapes must be exactly the model's, and every tensor must be finite
    fp32. Everything is checked before anything is copied, so a malformed update leaves the
    model untouched (ModelError listing every missing, unexpected or mismatched name).
    Frozen LoRA tensors are not part of a state and are left as they are.
    """
    params = _trainable_parameters(model)
    _check_state(state, {name: tuple(p.shape) for name, p in params.items()}, "adapter state")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def adapter_to_bytes(state: AdapterState) -> bytes:
    """Serialize an adapter as safetensors; the same state always gives the same bytes."""
    _check_values(state, "adapter state")
    tensors = {name: state[name].detach().to(device="cpu").contiguous() for name in sorted(state)}
    return safetensors_save(tensors)


def adapter_from_bytes(data: bytes) -> AdapterState:
    """Parse bytes from :func:`adapter_to_bytes`; rejects non-fp32 or non-finite tensors."""
    return _decode(data, "adapter bytes")


def save_adapter(state: AdapterState, path: Path) -> None:
    """Write an adapter to ``path`` as safetensors, atomically."""
    write_bytes_atomic(Path(path), adapter_to_bytes(state))


def load_adapter(path: Path) -> AdapterState:
    """Read an adapter written by :func:`save_adapter`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelError(f"cannot read adapter file {path}: {error}") from error
    return _decode(data, f"adapter file {path}")


def export_peft_folder(
    model: PeftModel,
    state: AdapterState,
    out_dir: Path,
    *,
    base_model_path: str,
    replace: bool = False,
) -> None:
    """Write ``state`` as a standard PEFT folder that ``PeftModel.from_pretrained`` loads.

    The folder (adapter_config.json and adapter_model.safetensors) takes the LoRA settings
    from ``model`` and records ``base_model_path`` as ``base_model_name_or_path``. It appears
    atomically. An existing ``out_dir`` is an error (FileExistsError) unless ``replace`` is
    true, in which case it is swapped for the new folder in one step. Frozen LoRA tensors
    (FFA-LoRA's A) are taken from ``model``, so the folder holds the whole adapter.
    """
    trainable = _trainable_parameters(model)
    _check_state(state, {name: tuple(p.shape) for name, p in trainable.items()}, "adapter state")
    frozen = {
        name: param.detach().to(device="cpu", dtype=torch.float32)
        for name, param in _adapter_parameters(model).items()
        if name not in trainable
    }
    config = copy.deepcopy(model.peft_config[model.active_adapter])
    config.base_model_name_or_path = base_model_path
    config.inference_mode = True
    settings = config.to_dict()
    for key, value in settings.items():
        # Sets have no stable order across processes; a sorted list keeps the file reproducible.
        if isinstance(value, set):
            settings[key] = sorted(value)
    full = {**frozen, **state}
    weights = {name: full[name].detach().contiguous() for name in sorted(full)}
    with atomic_folder(Path(out_dir), replace=replace) as tmp:
        write_bytes_atomic(
            tmp / _ADAPTER_CONFIG,
            (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        )
        write_bytes_atomic(tmp / _ADAPTER_WEIGHTS, safetensors_save(weights, {"format": "pt"}))


def _linear_module_names(model: nn.Module) -> set[str]:
    """Last name components of the model's ``nn.Linear`` modules (what peft matches on)."""
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name
    }


def _init_lora(model: PeftModel, init_seed: int) -> None:
    generator = torch.Generator().manual_seed(init_seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
            elif ".lora_B." in name:
                nn.init.zeros_(param)


def _adapter_parameters(model: PeftModel) -> dict[str, nn.Parameter]:
    """The active adapter's parameters, keyed by their peft state-dict names."""
    adapter = model.active_adapter
    params: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if ".lora_" in name and f".{adapter}." in name:
            params[name.replace(f".{adapter}.", ".")] = param
    expected = set(get_peft_model_state_dict(model))
    if set(params) != expected:
        # Guards the name mapping above against a peft naming change.
        raise ModelError(
            "cannot map the model's LoRA parameters to peft state-dict names: "
            f"{sorted(set(params) ^ expected)[:5]}"
        )
    return dict(sorted(params.items()))


def _trainable_parameters(model: PeftModel) -> dict[str, nn.Parameter]:
    """The adapter parameters that training changes: what an adapter state holds."""
    return {name: p for name, p in _adapter_parameters(model).items() if p.requires_grad}


def _check_state(
    state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], source: str
) -> None:
    problems: list[str] = []
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    mismatched = [
        f"{name} has shape {tuple(state[name].shape)}, expected {shapes[name]}"
        for name in sorted(set(shapes) & set(state))
        if tuple(state[name].shape) != shapes[name]
    ]
    if mismatched:
        problems.append(f"mismatched shapes: {'; '.join(mismatched)}")
    if problems:
        raise ModelError(f"{source} does not fit the model's adapter: {', '.join(problems)}")
    _check_values(state, source)


def _check_values(state: Mapping[str, torch.Tensor], source: str) -> None:
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            raise ModelError(f"{source}: {name} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype != torch.float32:
            raise ModelError(f"{source}: tensor {name} is {tensor.dtype}, expected torch.float32")
        if not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{source}: tensor {name} holds NaN or infinite values")


def _decode(data: bytes, source: str) -> AdapterState:
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError) as error:
        raise ModelError(f"{source} is not a valid safetensors adapter: {error}") from error
    _check_values(tensors, source)
    return {name: tensors[name].contiguous() for name in sorted(tensors)}
