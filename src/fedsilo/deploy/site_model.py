"""A deployed site's model, data and keys, loaded once and kept for every round.

The base model is loaded when the site starts, before it joins; the LoRA adapter is attached
when the first round task says which shape the federation uses, and kept while later tasks ask
for the same shape. Examples are encoded once per maximum length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context
from transformers import PreTrainedModel

from fedsilo.client.policy import SitePolicy, SiteSection
from fedsilo.client.site import Site
from fedsilo.crypto import (
    PrivateKey,
    PublicKey,
    private_key_is_encrypted,
    read_passphrase,
    read_private_key,
    read_public_key,
)
from fedsilo.data.encode import Example, encode_records
from fedsilo.data.records import Record, load_records
from fedsilo.model.adapters import attach_lora, get_adapter_state
from fedsilo.model.base import base_model_hash, load_base_model, resolve_base_model
from fedsilo.protocol.records import LoraSpec
from fedsilo.training.compilation import machine_compile, prepare_compiled_training
from fedsilo.training.precision import hold_base_weights_in, machine_precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteIdentity:
    """The site's keys: its signing key, and the coordinator key its receipts verify with."""

    signing_key: PrivateKey
    coordinator_key: PublicKey
    # The federation's pinned site keys ([connect] peers), for secure aggregation.
    peer_keys: Mapping[str, PublicKey] = field(default_factory=dict)


def read_site_key(path: Path, *, passphrase_file: Path | None) -> PrivateKey:
    """The site's signing key: decrypted with the passphrase in ``passphrase_file`` when the
    policy names one, else (for an encrypted key) with the one in $FEDSILO_KEY_PASSPHRASE."""
    if passphrase_file is not None:
        passphrase = read_passphrase(passphrase_file, source=str(path))
    elif private_key_is_encrypted(path):
        passphrase = read_passphrase(None, source=str(path))
    else:
        passphrase = None
    return read_private_key(path, passphrase=passphrase)


def load_identity(policy: SitePolicy) -> SiteIdentity:
    """Read the keys a policy's [site] and [connect] sections name."""
    assert policy.site is not None and policy.connect is not None
    keys = policy.site.keys_dir
    peers = policy.connect.peers
    return SiteIdentity(
        signing_key=read_site_key(
            keys / f"{policy.site.name}.key", passphrase_file=policy.site.passphrase_file
        ),
        coordinator_key=read_public_key(policy.connect.coordinator_key),
        peer_keys={}
        if peers is None
        else {path.stem: read_public_key(path) for path in sorted(Path(peers).glob("*.pub"))},
    )


class DeployedSite:
    """The one site this process serves (a :class:`fedsilo.client.site.SiteProvider`)."""

    def __init__(self, policy: SitePolicy, identity: SiteIdentity) -> None:
        if policy.site is None:
            raise ValueError("a deployed site's policy needs a [site] section")
        self.policy = policy
        self.section: SiteSection = policy.site
        self.identity = identity
        started = time.perf_counter()
        self.records: list[Record] = load_records(self.section.data)
        folder = resolve_base_model(self.section.base_model)
        self.base_model_hash = base_model_hash(folder)
        self._folder = folder
        self._base: PreTrainedModel | None
        self._base, self.tokenizer = load_base_model(folder)
        self.load_seconds = time.perf_counter() - started
        self._lora: LoraSpec | None = None
        self._site: Site | None = None
        # The records encoded at the last round's max_length, only: the coordinator chooses the
        # length each round, and keeping every length it asked for would let it grow the
        # site's memory by one copy of its data per distinct value.
        self._encoded: tuple[int, tuple[Example, ...]] | None = None
        log.info(
            "site %s: %d records, base model %s loaded in %.1f s",
            self.section.name,
            len(self.records),
            self.base_model_hash,
            self.load_seconds,
        )

    @property
    def name(self) -> str:
        return self.section.name

    def prepare(self, lora: LoraSpec, *, max_length: int) -> None:
        """Make ``site_for`` return a site with this adapter shape and encoding length."""
        if self._site is not None and self._lora == lora and self._encoded_at(max_length):
            return
        if self._lora != lora or self._site is None:
            base = self._base
            if base is None:  # a new shape: peft wrapped the old base in place, reload it
                base, self.tokenizer = load_base_model(self._folder)
            self._base = None
            model = attach_lora(
                base,
                rank=lora.rank,
                alpha=lora.alpha,
                dropout=lora.dropout,
                target_modules=lora.target_modules,
                init_seed=0,  # every round starts from the global adapter it is sent
            )
            # The site's own hardware decides its precision (its policy may pin it).
            hold_base_weights_in(model, machine_precision(self.section.precision).precision)
            if machine_compile(self.section.compile).enabled:
                prepare_compiled_training(model)
            self._lora = lora
            template = get_adapter_state(model)
        else:
            model, template = self._site.model, self._site.adapter_template
        if self._encoded is None or not self._encoded_at(max_length):
            self._encoded = None  # the old encoding goes before the new one is built
            self._encoded = (
                max_length,
                tuple(
                    encode_records(
                        self.tokenizer,
                        self.records,
                        system_prompt=self.section.system_prompt,
                        max_length=max_length,
                        source=f"site {self.name} ({self.section.data})",
                    )
                ),
            )
        state = self.section.state_dir
        self._site = Site(
            name=self.name,
            model=model,
            tokenizer=self.tokenizer,
            examples=self._encoded[1],
            base_model_hash=self.base_model_hash,
            adapter_template=template,
            signing_key=self.identity.signing_key,
            coordinator_key=self.identity.coordinator_key,
            receipts_dir=state / "receipts",
            spent_path=state / "privacy-spent.json",
            sessions_path=state / "secure-sessions.json",
            policy=self.policy,
            peer_keys=self.identity.peer_keys,
        )

    def _encoded_at(self, max_length: int) -> bool:
        return self._encoded is not None and self._encoded[0] == max_length

    def site_for(self, context: Context) -> Site:
        del context  # one site per process: every node context is this site
        if self._site is None:
            raise RuntimeError(
                f"site {self.name}: no round task has prepared the model yet (receipt before "
                "any training?)"
            )
        return self._site

    @property
    def receipts_dir(self) -> Path:
        return self.section.state_dir / "receipts"
