"""The sites of a simulated federation, all served from one run folder.

Node ``partition-id`` i is the task's site i. Each site's key pair and receipts live in
RUN/sites/NAME/, standing in for that site's own machine.
"""

from __future__ import annotations

import logging
import threading
from functools import cached_property
from pathlib import Path

import torch
from flwr.app import Context

from fedsilo.client.policy import PolicyError, SitePolicy, check_lora, load_policy
from fedsilo.client.site import LoadedModel, Site, load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.crypto import read_private_key
from fedsilo.data.encode import encode_records
from fedsilo.data.icd10 import TaskData
from fedsilo.data.tasks import build_task
from fedsilo.protocol.records import LoraSpec
from fedsilo.server.membership import Membership
from fedsilo.simulation.enrollment import site_folder, site_key_path

log = logging.getLogger(__name__)


class SimulatedSites:
    """Finds and prepares the site a simulated node stands for.

    The model is loaded once per process and per lane of ``run.concurrent_sites``: site i
    trains on copy i mod concurrent_sites, so sites that train at the same time (in the lanes
    of fedsilo.simulation.inprocess_grid) never share a model.
    """

    def __init__(self, config: FedsiloConfig, *, run_dir: Path, membership: Membership) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.membership = membership
        self._sites: dict[int, Site] = {}
        self._models: dict[int, LoadedModel] = {}
        self._preparing = threading.Lock()  # lanes ask for their first sites at the same time

    def __getstate__(self) -> dict[str, object]:
        # Flower's Ray engine ships the client app to its actors by value; a lock does not
        # travel, and each actor makes its own.
        state = dict(self.__dict__)
        del state["_preparing"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._preparing = threading.Lock()

    def _loaded(self, index: int) -> LoadedModel:
        lane = index % self.config.run.concurrent_sites
        if lane not in self._models:
            # Each simulated site process (a Ray actor) or lane keeps to its thread budget.
            torch.set_num_threads(self.config.run.site_threads)
            self._models[lane] = load_model_with_adapter(self.config)
        return self._models[lane]

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
        with self._preparing:
            if index not in self._sites:
                self._sites[index] = self._prepare(index)
            return self._sites[index]

    def _prepare(self, index: int) -> Site:
        data = self._task.sites[index]
        policy = self._policy(data.name)
        if policy is not None:
            # A simulated site loads the run's adapter, which no message carries (a deployed
            # site checks the one a round names): held to the site's limits before loading.
            check_lora(policy, LoraSpec.of(self.config.lora), site=data.name)
        loaded = self._loaded(index)
        examples = encode_records(
            loaded.tokenizer,
            data.records,
            system_prompt=self._task.system_prompt,
            max_length=self.config.train.max_length,
            source=f"site {data.name}",
        )
        folder = site_folder(self.run_dir, data.name)
        log.info("site %s: %d training examples", data.name, len(examples))
        return Site(
            name=data.name,
            model=loaded.model,
            tokenizer=loaded.tokenizer,
            examples=tuple(examples),
            base_model_hash=loaded.base_model_hash,
            adapter_template=loaded.adapter_template,
            signing_key=read_private_key(
                site_key_path(self.run_dir, self.config.federation, data.name), passphrase=None
            ),
            coordinator_key=self.membership.coordinator_key(),
            receipts_dir=folder / "receipts",
            spent_path=folder / "privacy-spent.json",
            sessions_path=folder / "secure-sessions.json",
            policy=policy,
            peer_keys=self.membership.site_keys(),
        )

    def _policy(self, site: str) -> SitePolicy | None:
        path = policy_path(self.config, site)
        if path is None:
            return None
        return load_policy(path)


def policy_path(config: FedsiloConfig, site: str) -> Path | None:
    """The policy file a simulated site trains under; None only for a run that is explicitly
    a simulation without policies (``run.require_site_policies = false``).

    Raises PolicyError naming the file it looked for when the site has none: a missing or
    misnamed policy file must not quietly mean "no rules".
    """
    folder = config.run.site_policies
    path = None if folder is None else folder / f"{site}.toml"
    if path is not None and path.is_file():
        return path
    if not config.run.require_site_policies:
        return None
    looked_for = (
        f"{path}" if path is not None else f"{site}.toml (run.site_policies names no folder)"
    )
    raise PolicyError(
        f"site {site}: no policy file at {looked_for}; the site refuses to train without its "
        "policy. Add the file, or set run.require_site_policies = false for a simulation "
        "without policies"
    )
