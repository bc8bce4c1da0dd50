"""A site as the client app sees it: its model, its encoded examples, its identity.

The model is loaded once per process and kept: sites that share a process (simulation) take
turns on one model, each round starting from the global adapter it was sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch
from flwr.app import Context
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedsilo.config import FedsiloConfig
from fedsilo.data.encode import Example, encode_records
from fedsilo.data.icd10 import TaskData
from fedsilo.data.tasks import build_task
from fedsilo.model.adapters import AdapterState, attach_lora, get_adapter_state
from fedsilo.model.base import base_model_hash, load_base_model, resolve_base_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """What one site trains with."""

    name: str
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    examples: tuple[Example, ...]
    base_model_hash: str
    adapter_template: AdapterState  # expected adapter names and shapes


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


def load_model_with_adapter(config: FedsiloConfig) -> LoadedModel:
    """Resolve, hash and load the base model, then attach the run's LoRA adapter."""
    folder = resolve_base_model(config.model.base)
    digest = base_model_hash(folder)
    base, tokenizer = load_base_model(folder)
    lora = config.lora
    model = attach_lora(
        base,
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=lora.target_modules,
        init_seed=config.run.seed,
    )
    return LoadedModel(model, tokenizer, digest, get_adapter_state(model))


class SimulatedSites:
    """Sites of a simulated federation: node ``partition-id`` i is the task's site i."""

    def __init__(self, config: FedsiloConfig) -> None:
        self.config = config
        self._sites: dict[int, Site] = {}

    @cached_property
    def _loaded(self) -> LoadedModel:
        # Each simulated site process (a Ray actor) keeps to its own thread budget.
        torch.set_num_threads(self.config.run.torch_threads)
        return load_model_with_adapter(self.config)

    @cached_property
    def _task(self) -> TaskData:
        return build_task(self.config.task, seed=self.config.run.seed)

    def site_for(self, context: Context) -> Site:
        index = context.node_config.get("partition-id")
        if not isinstance(index, int) or not 0 <= index < len(self._task.sites):
            raise ValueError(
                f"node {context.node_id}: node_config partition-id={index!r} does not name one of "
                f"the {len(self._task.sites)} sites of this task"
            )
        if index not in self._sites:
            data = self._task.sites[index]
            loaded = self._loaded
            examples = encode_records(
                loaded.tokenizer,
                data.records,
                system_prompt=self._task.system_prompt,
                max_length=self.config.train.max_length,
                source=f"site {data.name}",
            )
            self._sites[index] = Site(
                name=data.name,
                model=loaded.model,
                tokenizer=loaded.tokenizer,
                examples=tuple(examples),
                base_model_hash=loaded.base_model_hash,
                adapter_template=loaded.adapter_template,
            )
            log.info("site %s: %d training examples", data.name, len(examples))
        return self._sites[index]
