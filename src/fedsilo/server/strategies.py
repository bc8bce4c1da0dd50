"""Server strategies: how the global adapter moves given the sites' updates.

Every strategy pairs what it asks of the sites (``site_settings``) with how it combines their
replies: a round folds each accepted update into the strategy's running sum (``new_sum``) as it
arrives and drops it, then ``aggregate`` turns the sum into the next global adapter. So the
coordinator holds one sum per round, not one update per site. Updates are adapter deltas
(trained minus global); sums are taken in float64 so the result does not depend on the order
replies arrived in, beyond the final cast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from fedsilo.config import StrategySection
from fedsilo.model.adapters import AdapterState


@dataclass(frozen=True)
class SiteUpdate:
    """One site's accepted contribution to a round."""

    site: str
    delta: AdapterState
    num_examples: int


@dataclass(frozen=True)
class SiteSettings:
    """Strategy-specific settings sent to every site with the round task."""

    proximal_mu: float


@dataclass(frozen=True)
class WeighedUpdate:
    """A site's delta times its weight, in float64, checked to fit the round's sum."""

    site: str
    weighted: dict[str, torch.Tensor]
    weight: float
    num_examples: int


class UpdateSum:
    """Running example-weighted sum of site deltas, in float64: all a round keeps of its updates.

    ``add`` folds an update in; the caller can then drop it, so the memory a round needs is
    this sum (twice the fp32 adapter) whatever the number of sites.
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self.weight = 0.0
        self.sites: list[str] = []
        self.examples = 0

    @property
    def count(self) -> int:
        """How many updates were added."""
        return len(self.sites)

    def weigh(self, update: SiteUpdate) -> tuple[AdapterState, float]:
        """The delta to add and its weight: the update's own delta, by its example count."""
        return update.delta, float(update.num_examples)

    def add(self, update: SiteUpdate) -> None:
        """Fold ``update`` into the sum, whole or not at all (ValueError naming the site)."""
        self.fold(self.checked(update))

    def checked(self, update: SiteUpdate) -> WeighedUpdate:
        """``update`` weighed and checked to fit the sum (ValueError naming the site), not yet
        folded in: a caller can ledger it between the two."""
        delta, weight = self.weigh(update)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"update from {update.site} has weight {weight}")
        if self._sum and delta.keys() != self._sum.keys():
            raise ValueError(f"update from {update.site} has other tensors than the round's sum")
        weighted = {name: tensor.to(torch.float64) * weight for name, tensor in delta.items()}
        if not all(bool(torch.isfinite(t).all()) for t in weighted.values()):
            raise ValueError(f"update from {update.site} is not finite once weighted")
        return WeighedUpdate(update.site, weighted, weight, update.num_examples)

    def fold(self, update: WeighedUpdate) -> None:
        """Add what :meth:`checked` returned to the sum."""
        if not self._sum:
            self._sum = {name: torch.zeros_like(t) for name, t in update.weighted.items()}
        for name, tensor in update.weighted.items():
            self._sum[name] += tensor
        self.weight += update.weight
        self.sites.append(update.site)
        self.examples += update.num_examples

    def total(self) -> dict[str, torch.Tensor]:
        """The float64 weighted sum; raises when nothing was added."""
        if not self._sum:
            raise ValueError("cannot aggregate a round with no updates")
        return self._sum

    def mean(self) -> AdapterState:
        """sum_i w_i * d_i / sum_i w_i, cast to float32."""
        total = self.total()
        if self.weight <= 0:
            raise ValueError("cannot weight updates: the sites reported no examples")
        return {name: (value / self.weight).to(torch.float32) for name, value in total.items()}


class Strategy(Protocol):
    """A federated optimisation algorithm on adapter tensors."""

    name: str

    def site_settings(self) -> SiteSettings:
        """What sites must do differently under this strategy."""
        ...

    def new_sum(self) -> UpdateSum:
        """An empty sum for one round's updates, weighing them as this strategy does."""
        ...

    def aggregate(self, global_state: AdapterState, updates: UpdateSum) -> AdapterState:
        """The next global adapter from the round's sum. Raises when the sum is empty."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server-side optimizer state, checkpointed with the adapter so a resume is exact."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


class FedAvg:
    """FedAvg (McMahan et al. 2017): the global adapter plus the example-weighted mean delta.

    With ``server_momentum`` m > 0 (FedAvgM, Hsu et al. 2019, in Nesterov's form) the server
    keeps a velocity of the mean deltas, v <- m v + d, and moves by d + m v. Where the sites'
    deltas keep one direction from round to round the global adapter moves up to 1 / (1 - m)
    times as far; where they alternate, the velocity cancels. A round of a few local steps per
    site moves the global adapter about as far as one site's few steps, however many sites
    trained: the velocity carries that progress across rounds, as many sequential steps do in
    centralized training. It acts on the (possibly noised, possibly securely summed) mean only,
    so it changes nothing a site sends or what DP protects.
    """

    name = "fedavg"

    def __init__(self, *, server_momentum: float = 0.0) -> None:
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
        self.server_momentum = server_momentum
        self._velocity: AdapterState = {}

    def site_settings(self) -> SiteSettings:
        return SiteSettings(proximal_mu=0.0)

    def new_sum(self) -> UpdateSum:
        return UpdateSum()

    def aggregate(self, global_state: AdapterState, updates: UpdateSum) -> AdapterState:
        mean = updates.mean()
        momentum = self.server_momentum
        if momentum == 0.0:
            return {name: global_state[name] + mean[name] for name in global_state}
        new_state: AdapterState = {}
        for name, value in global_state.items():
            velocity = momentum * self._velocity.get(name, torch.zeros_like(value)) + mean[name]
            self._velocity[name] = velocity
            new_state[name] = value + mean[name] + momentum * velocity
        return new_state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"velocity.{name}": value.clone() for name, value in self._velocity.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state and self.server_momentum == 0.0:
            raise ValueError(f"FedAvg without momentum keeps no server state, got {sorted(state)}")
        unknown = [key for key in state if not key.startswith("velocity.")]
        if unknown:
            raise ValueError(f"FedAvg state has unexpected entries {unknown[:5]}")
        self._velocity = {key[len("velocity.") :]: value.clone() for key, value in state.items()}


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg aggregation, sites add (mu / 2) * ||w - w_g||^2."""

    name = "fedprox"

    def __init__(self, *, proximal_mu: float, server_momentum: float = 0.0) -> None:
        super().__init__(server_momentum=server_momentum)
        self.proximal_mu = proximal_mu

    def site_settings(self) -> SiteSettings:
        return SiteSettings(proximal_mu=self.proximal_mu)


class FedAdam:
    """FedAdam (Reddi et al. 2021): Adam on the server, the mean delta as pseudo-gradient.

    m <- b1 m + (1 - b1) d;  v <- b2 v + (1 - b2) d^2;  x <- x + lr * m / (sqrt(v) + tau),
    as in Algorithm 2 of the paper (no bias correction).
    """

    name = "fedadam"

    def __init__(
        self, *, server_learning_rate: float, beta_1: float, beta_2: float, tau: float
    ) -> None:
        self.server_learning_rate = server_learning_rate
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.tau = tau
        self._m: AdapterState = {}
        self._v: AdapterState = {}

    def site_settings(self) -> SiteSettings:
        return SiteSettings(proximal_mu=0.0)

    def new_sum(self) -> UpdateSum:
        return UpdateSum()

    def aggregate(self, global_state: AdapterState, updates: UpdateSum) -> AdapterState:
        delta = updates.mean()
        new_state: AdapterState = {}
        for name, value in global_state.items():
            m = self._m.get(name, torch.zeros_like(value))
            v = self._v.get(name, torch.zeros_like(value))
            m = self.beta_1 * m + (1 - self.beta_1) * delta[name]
            v = self.beta_2 * v + (1 - self.beta_2) * delta[name] ** 2
            self._m[name], self._v[name] = m, v
            new_state[name] = value + self.server_learning_rate * m / (torch.sqrt(v) + self.tau)
        return new_state

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"m.{name}": value.clone() for name, value in self._m.items()}
        state.update({f"v.{name}": value.clone() for name, value in self._v.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = [key for key in state if not key.startswith(("m.", "v."))]
        if unknown:
            raise ValueError(f"FedAdam state has unexpected entries {unknown[:5]}")
        self._m = {key[2:]: value.clone() for key, value in state.items() if key.startswith("m.")}
        self._v = {key[2:]: value.clone() for key, value in state.items() if key.startswith("v.")}


STRATEGIES: dict[str, Callable[[StrategySection], Strategy]] = {
    "fedavg": lambda settings: FedAvg(server_momentum=settings.server_momentum),
    "fedprox": lambda settings: FedProx(
        proximal_mu=settings.proximal_mu, server_momentum=settings.server_momentum
    ),
    "fedadam": lambda settings: FedAdam(
        server_learning_rate=settings.server_learning_rate,
        beta_1=settings.beta_1,
        beta_2=settings.beta_2,
        tau=settings.tau,
    ),
}


def build_strategy(settings: StrategySection) -> Strategy:
    """The strategy named in the config."""
    return STRATEGIES[settings.name](settings)
