"""Aggregation arithmetic checked against hand-computed values."""

import pytest
import torch

from fedsilo.config import StrategySection
from fedsilo.server.strategies import (
    STRATEGIES,
    FedAdam,
    FedAvg,
    FedProx,
    SiteUpdate,
    Strategy,
    UpdateSum,
    build_strategy,
)


def _update(site: str, value: list[float], n: int) -> SiteUpdate:
    return SiteUpdate(site=site, delta={"w": torch.tensor(value)}, num_examples=n)


def _aggregate(
    strategy: Strategy, global_state: dict[str, torch.Tensor], updates: list[SiteUpdate]
) -> dict[str, torch.Tensor]:
    total = strategy.new_sum()
    for update in updates:
        total.add(update)
    return strategy.aggregate(global_state, total)


def test_fedavg_is_example_weighted() -> None:
    global_state = {"w": torch.tensor([1.0, 1.0])}
    updates = [_update("a", [1.0, 0.0], 1), _update("b", [0.0, 4.0], 3)]

    result = _aggregate(FedAvg(), global_state, updates)

    # (1*[1,0] + 3*[0,4]) / 4 = [0.25, 3.0]
    assert torch.equal(result["w"], torch.tensor([1.25, 4.0]))


def test_fedavg_order_does_not_change_the_result() -> None:
    global_state = {"w": torch.zeros(1000)}
    gen = torch.Generator().manual_seed(0)
    updates = [
        SiteUpdate(f"s{i}", {"w": torch.randn(1000, generator=gen)}, num_examples=i + 1)
        for i in range(5)
    ]

    forward = _aggregate(FedAvg(), global_state, updates)
    backward = _aggregate(FedAvg(), global_state, list(reversed(updates)))

    assert torch.equal(forward["w"], backward["w"])


def test_no_updates_is_an_error() -> None:
    with pytest.raises(ValueError, match="no updates"):
        FedAvg().aggregate({"w": torch.zeros(1)}, UpdateSum())


def test_a_sum_holds_one_tensor_set_whatever_the_number_of_updates() -> None:
    total = UpdateSum()
    for i in range(50):
        total.add(_update(f"s{i}", [float(i)], 2))

    assert total.count == 50 and total.examples == 100
    assert total.total()["w"].dtype == torch.float64
    assert total.mean()["w"].item() == pytest.approx(24.5)


def test_an_update_with_other_tensors_is_refused_naming_the_site() -> None:
    total = UpdateSum()
    total.add(_update("a", [1.0], 1))

    with pytest.raises(ValueError, match="from b"):
        total.add(SiteUpdate("b", {"v": torch.tensor([1.0])}, 1))


def test_fedprox_aggregates_like_fedavg_and_asks_sites_for_mu() -> None:
    global_state = {"w": torch.tensor([0.0])}
    updates = [_update("a", [2.0], 1), _update("b", [4.0], 1)]

    prox = FedProx(proximal_mu=0.5)

    assert torch.equal(_aggregate(prox, global_state, updates)["w"], torch.tensor([3.0]))
    assert prox.site_settings().proximal_mu == 0.5
    assert FedAvg().site_settings().proximal_mu == 0.0


def test_fedadam_matches_hand_computed_steps() -> None:
    adam = FedAdam(server_learning_rate=0.1, beta_1=0.9, beta_2=0.99, tau=0.001)
    state = {"w": torch.tensor([0.0])}

    state = _aggregate(adam, state, [_update("a", [2.0], 1)])
    # m = 0.2, v = 0.04, x = 0.1 * 0.2 / (0.2 + 0.001)
    first = 0.1 * 0.2 / (0.2 + 0.001)
    assert state["w"].item() == pytest.approx(first, rel=1e-6)

    state = _aggregate(adam, state, [_update("a", [-1.0], 1)])
    m = 0.9 * 0.2 + 0.1 * -1.0
    v = 0.99 * 0.04 + 0.01 * 1.0
    assert state["w"].item() == pytest.approx(first + 0.1 * m / (v**0.5 + 0.001), rel=1e-6)


def test_fedadam_state_round_trips_for_resume() -> None:
    adam = FedAdam(server_learning_rate=0.1, beta_1=0.9, beta_2=0.99, tau=0.001)
    state = _aggregate(adam, {"w": torch.tensor([0.0])}, [_update("a", [2.0], 1)])
    restored = FedAdam(server_learning_rate=0.1, beta_1=0.9, beta_2=0.99, tau=0.001)
    restored.load_state_dict(adam.state_dict())

    next_original = _aggregate(adam, state, [_update("a", [1.0], 1)])
    next_restored = _aggregate(restored, state, [_update("a", [1.0], 1)])

    assert torch.equal(next_original["w"], next_restored["w"])


def test_fedavg_momentum_matches_hand_computed_nesterov_steps() -> None:
    fedavgm = FedAvg(server_momentum=0.5)
    state = {"w": torch.tensor([0.0])}

    state = _aggregate(fedavgm, state, [_update("a", [2.0], 1), _update("b", [2.0], 3)])
    # v = 2; w = 0 + 2 + 0.5 * 2
    assert state["w"].item() == pytest.approx(3.0)

    state = _aggregate(fedavgm, state, [_update("a", [-1.0], 1)])
    # v = 0.5 * 2 - 1 = 0; w = 3 - 1 + 0
    assert state["w"].item() == pytest.approx(2.0)

    state = _aggregate(fedavgm, state, [_update("a", [1.0], 1)])
    # v = 0 + 1 = 1; w = 2 + 1 + 0.5
    assert state["w"].item() == pytest.approx(3.5)


def test_fedavg_momentum_state_round_trips_for_resume() -> None:
    fedavgm = FedProx(proximal_mu=0.1, server_momentum=0.7)
    state = _aggregate(fedavgm, {"w": torch.tensor([0.0])}, [_update("a", [2.0], 1)])
    restored = FedProx(proximal_mu=0.1, server_momentum=0.7)
    restored.load_state_dict(fedavgm.state_dict())

    next_original = _aggregate(fedavgm, state, [_update("a", [1.0], 1)])
    next_restored = _aggregate(restored, state, [_update("a", [1.0], 1)])

    assert torch.equal(next_original["w"], next_restored["w"])
    # A plain FedAvg would silently drop the velocity: it refuses the state instead.
    with pytest.raises(ValueError, match="without momentum"):
        FedAvg().load_state_dict(fedavgm.state_dict())


def test_server_momentum_is_refused_for_fedadam() -> None:
    with pytest.raises(ValueError, match="server_momentum applies to fedavg and fedprox"):
        StrategySection(name="fedadam", server_momentum=0.5)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_moves_towards_a_consistent_update(name: str) -> None:
    strategy = build_strategy(StrategySection(name=name))  # type: ignore[arg-type]
    global_state = {"w": torch.zeros(3)}
    updates = [_update("a", [1.0, 1.0, 1.0], 2), _update("b", [1.0, 1.0, 1.0], 5)]

    result = _aggregate(strategy, global_state, updates)

    assert set(result) == {"w"}
    assert torch.all(result["w"] > 0)
    assert result["w"].dtype == torch.float32
