"""Site-level differential privacy at the coordinator: clip each site's update, noise the sum.

Under site-level DP the unit of privacy is one site's whole data. Each round every accepted
update is clipped to L2 norm ``clip_norm`` (over all adapter tensors together), the clipped
updates are summed, Gaussian noise N(0, (noise_multiplier * clip_norm)^2) is added to every
coordinate, and the result is divided by the number of sites asked in the round (fixed, public
weights: a site's example count never influences the aggregate, so it cannot leak). The wrapped
strategy then applies that noised mean as if it were the only update (FedAvg adds it, FedAdam
uses it as its pseudo-gradient). The noise comes from a generator seeded from the operating
system's secure random source. Accounted per round as a
:class:`fedsilo.privacy.events.SampledSitesGaussianEvent`.

The coordinator sees each site's update before the noise (central DP with a trusted
aggregator); a coordinator that must not see them uses secure aggregation, under which the
sites add the noise themselves (:mod:`fedsilo.privacy.distributed_dp`) and this wrapper is not
used.
"""

from __future__ import annotations

import math
import secrets

import torch

from fedsilo.model.adapters import AdapterState
from fedsilo.server.strategies import SiteSettings, SiteUpdate, Strategy, UpdateSum


def clip_update(delta: AdapterState, *, clip_norm: float) -> AdapterState:
    """Scale ``delta`` down so its L2 norm over all tensors is at most ``clip_norm``."""
    norm = math.sqrt(sum(float(torch.sum(t.double() ** 2)) for t in delta.values()))
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: tensor * factor for name, tensor in delta.items()}


class ClippedSum(UpdateSum):
    """Sum of site deltas, each clipped to ``clip_norm`` and weighed equally (counts ignored)."""

    def __init__(self, *, clip_norm: float) -> None:
        super().__init__()
        self.clip_norm = clip_norm

    def weigh(self, update: SiteUpdate) -> tuple[AdapterState, float]:
        return clip_update(update.delta, clip_norm=self.clip_norm), 1.0


class SiteLevelDp:
    """Wraps a strategy: clipped, noised, equally weighted mean of the site updates."""

    def __init__(
        self,
        inner: Strategy,
        *,
        clip_norm: float,
        noise_multiplier: float,
        cohort_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if clip_norm <= 0 or noise_multiplier <= 0 or cohort_size < 1:
            raise ValueError("clip_norm and noise_multiplier must be > 0, cohort_size >= 1")
        self.inner = inner
        self.name = f"{inner.name}+site-dp"
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.cohort_size = cohort_size
        self._generator = generator or torch.Generator().manual_seed(secrets.randbits(63))

    def site_settings(self) -> SiteSettings:
        return self.inner.site_settings()

    def new_sum(self) -> ClippedSum:
        return ClippedSum(clip_norm=self.clip_norm)

    def noised_mean(self, updates: UpdateSum) -> AdapterState:
        """(sum of clipped deltas + noise) / cohort size."""
        if not isinstance(updates, ClippedSum) or updates.clip_norm != self.clip_norm:
            # An unclipped sum would void the sensitivity the noise is calibrated to.
            raise TypeError(f"site-level DP needs a sum clipped to {self.clip_norm}")
        std = self.noise_multiplier * self.clip_norm
        mean: AdapterState = {}
        for name, total in updates.total().items():
            noise = torch.randn(total.shape, generator=self._generator, dtype=torch.float64) * std
            mean[name] = ((total + noise) / self.cohort_size).to(torch.float32)
        return mean

    def aggregate(self, global_state: AdapterState, updates: UpdateSum) -> AdapterState:
        noised = UpdateSum()
        noised.add(SiteUpdate("site-dp-noised-mean", self.noised_mean(updates), num_examples=1))
        return self.inner.aggregate(global_state, noised)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)
