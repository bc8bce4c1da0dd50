"""Site-level DP at the coordinator: clipping, noise scale, fixed weights, accounting."""

from collections.abc import Callable
from pathlib import Path

import dp_accounting
import pytest
import torch

from fedsilo.config import FedsiloConfig
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.server.run_folder import RunFolder
from fedsilo.server.site_dp import SiteLevelDp, clip_update
from fedsilo.server.strategies import FedAvg, SiteUpdate, UpdateSum

from ..simulation.conftest import run_with_grid, stop_run_in_last_round


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(torch.sum(t.double() ** 2) for t in delta.values())))


def test_clipping_bounds_the_whole_update_and_leaves_small_ones_alone() -> None:
    big = {"a": torch.full((3,), 4.0), "b": torch.full((4,), 3.0)}
    small = {"a": torch.full((3,), 0.01)}

    assert _norm(clip_update(big, clip_norm=1.0)) == pytest.approx(1.0)
    assert torch.equal(clip_update(small, clip_norm=1.0)["a"], small["a"])


def test_example_counts_do_not_weigh_in() -> None:
    dp = SiteLevelDp(FedAvg(), clip_norm=10.0, noise_multiplier=1e-9, cohort_size=2)
    updates = [
        SiteUpdate("a", {"w": torch.tensor([1.0])}, num_examples=1),
        SiteUpdate("b", {"w": torch.tensor([3.0])}, num_examples=1000),
    ]

    total = dp.new_sum()
    for update in updates:
        total.add(update)
    result = dp.aggregate({"w": torch.tensor([0.0])}, total)

    assert result["w"].item() == pytest.approx(2.0, abs=1e-6)


def test_each_update_is_clipped_as_it_is_added() -> None:
    dp = SiteLevelDp(FedAvg(), clip_norm=1.0, noise_multiplier=1e-9, cohort_size=2)
    total = dp.new_sum()
    total.add(SiteUpdate("a", {"w": torch.tensor([30.0, 40.0])}, num_examples=1))
    total.add(SiteUpdate("b", {"w": torch.tensor([0.3, 0.4])}, num_examples=1))

    torch.testing.assert_close(total.total()["w"], torch.tensor([0.9, 1.2], dtype=torch.float64))


def test_an_unclipped_sum_is_refused() -> None:
    dp = SiteLevelDp(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, cohort_size=1)
    unclipped = UpdateSum()
    unclipped.add(SiteUpdate("a", {"w": torch.tensor([30.0])}, num_examples=1))

    with pytest.raises(TypeError, match=r"clipped to 1\.0"):
        dp.aggregate({"w": torch.tensor([0.0])}, unclipped)


def test_noise_has_the_stated_scale() -> None:
    dp = SiteLevelDp(
        FedAvg(),
        clip_norm=0.5,
        noise_multiplier=2.0,
        cohort_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    zero = dp.new_sum()
    for i in range(4):
        zero.add(SiteUpdate(str(i), {"w": torch.zeros(20_000)}, num_examples=1))

    mean = dp.noised_mean(zero)

    assert mean["w"].std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.05)


def test_site_level_run_reports_the_gaussian_composition(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(
        run={"rounds": 2},
        privacy={"site_level": True, "site_clip_norm": 0.1, "site_noise_multiplier": 2.0},
    )

    run_with_grid(config, tmp_path / "run")

    final = RunFolder(tmp_path / "run").read_metrics()[-1]
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 2))
    assert final["site_level_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    aggregated = [
        e
        for e in read_entries(tmp_path / "run" / "ledger.db")
        if e.kind is EntryKind.ROUND_AGGREGATED
    ]
    assert all(isinstance(e.payload["site_dp_event"], dict) for e in aggregated)


def test_sampled_sites_are_accounted_under_replace_one(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    privacy = {"site_level": True, "site_clip_norm": 0.1, "site_noise_multiplier": 2.0}
    config = make_config(
        run={"rounds": 1}, privacy=privacy, strategy={"sites_per_round": 2, "min_sites": 2}
    )

    run_with_grid(config, tmp_path / "sampled")

    final = RunFolder(tmp_path / "sampled").read_metrics()[-1]
    assert final["sites_ok"] == 2
    # 2 of 3 sites, fixed-size sampling: replacing one site moves the sum by 2 S.
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    accountant.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(3, 2, dp_accounting.GaussianDpEvent(1.0))
    )
    assert final["site_level_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def _site_level_run(make_config: Callable[..., FedsiloConfig], run_dir: Path) -> None:
    """Two rounds of central site-level DP (clip 0.1, noise 2) into ``run_dir``."""
    config = make_config(
        run={"rounds": 2},
        privacy={"site_level": True, "site_clip_norm": 0.1, "site_noise_multiplier": 2.0},
    )
    run_with_grid(config, run_dir)


def test_privacy_command_recomputes_site_level_epsilon(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedsilo.cli.main import main

    _site_level_run(make_config, tmp_path / "run")

    assert main(["privacy", str(tmp_path / "run")]) == 0

    assert "site-level epsilon of the global adapter" in capsys.readouterr().out


def test_privacy_command_checks_site_level_epsilon_through_the_last_reported_round(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A coordinator that crashed after ledgering round 2's aggregate, before its metrics line:
    # the reported epsilon is round 1's, and the ledger holds one more site-level event.
    from fedsilo.cli.main import main

    _site_level_run(make_config, tmp_path / "run")
    stop_run_in_last_round(RunFolder(tmp_path / "run"), 2, aggregated=True)

    assert main(["privacy", str(tmp_path / "run")]) == 0

    assert "through round 1, the last reported" in capsys.readouterr().out
