"""A site as the client app sees it: its model, its encoded examples, its identity.

The model is loaded once per process and kept: sites that share a process (simulation) take
turns on one model, each round starting from the global adapter it was sent. The site's signing
key stays with the site; receipts from the coordinator are kept in its own folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flwr.app import Context
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedsilo.client.policy import SitePolicy
from fedsilo.config import FedsiloConfig
from fedsilo.crypto import PrivateKey, PublicKey
from fedsilo.data.encode import Example
from fedsilo.model.adapters import AdapterState, attach_lora, get_adapter_state
from fedsilo.model.base import base_model_hash, load_base_model, resolve_base_model
from fedsilo.training.compilation import CompileChoice, machine_compile, prepare_compiled_training
from fedsilo.training.device import attention_kernel, resolve_device
from fedsilo.training.precision import PrecisionChoice, hold_base_weights_in, machine_precision


@dataclass(frozen=True)
class Site:
    """What one site trains with."""

    name: str
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    examples: tuple[Example, ...]
    base_model_hash: str
    adapter_template: AdapterState  # expected adapter names and shapes
    signing_key: PrivateKey
    coordinator_key: PublicKey  # verifies the coordinator's receipts
    receipts_dir: Path
    spent_path: Path  # the DP events this site has released, across runs
    policy: SitePolicy | None  # the site's own rules for what it accepts to train on
    # The federation's pinned site identity keys, installed at the site: secure aggregation
    # verifies every peer's key advertisement against them, so the server cannot swap keys.
    peer_keys: Mapping[str, PublicKey] = field(default_factory=dict)
    # The secure sessions this site has opened, kept across Flower runs (None: only in the
    # node's Context, as in tests that stand in for a site).
    sessions_path: Path | None = None


class SiteProvider(Protocol):
    """Finds the site that a Flower node stands for."""

    def site_for(self, context: Context) -> Site: ...


@dataclass(frozen=True)
class LoadedModel:
    """A base model with the run's LoRA adapter attached."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    base_model_hash: str
    adapter_template: AdapterState
    precision: PrecisionChoice  # the frozen base weights are held, and computed, in this
    compiled: CompileChoice  # whether local training runs the decoder layers compiled


def load_model_with_adapter(config: FedsiloConfig) -> LoadedModel:
    """Resolve, hash and load the base model, attach the run's LoRA adapter, hold the frozen
    base weights in the precision ``train.precision`` resolves to on this machine, place the
    model on ``train.device``, and prepare compiled local training if ``train.compile``
    resolves on.

    The adapter is initialised on the CPU before the move, so its seeded start (the template)
    is the same on every device. A ``"cuda"`` device without CUDA is refused (DeviceError)
    before anything is loaded.
    """
    device = resolve_device(config.train.device)
    folder = resolve_base_model(config.model.base)
    digest = base_model_hash(folder)
    base, tokenizer = load_base_model(folder, attention=attention_kernel(device))
    lora = config.lora
    model = attach_lora(
        base,
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=lora.target_modules,
        init_seed=config.run.seed,
        freeze_a=lora.ffa,
    )
    choice = machine_precision(config.train.precision, config.train.device)
    hold_base_weights_in(model, choice.precision)
    model.to(device)
    compiled = machine_compile(config.train.compile, config.train.device)
    if compiled.enabled:
        prepare_compiled_training(model)
    return LoadedModel(model, tokenizer, digest, get_adapter_state(model), choice, compiled)
