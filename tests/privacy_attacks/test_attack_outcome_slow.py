"""Proof by attack, end to end: what DP-SGD must prevent, and that it does.

A two-site federation on the tiny model trains with canaries planted in one site's records.
Without DP the planted secrets must be memorised (their combined exposure is all but impossible
for unseen secrets); with record-level DP at epsilon <= 8 they must be indistinguishable from
secrets never planted: the p-value under "never seen" is not small. The significance level 0.001
bounds how often the DP test fails by chance even when DP works perfectly.
"""

from pathlib import Path

import pytest

from fedsilo.server.progress import LogReporter
from fedsilo.simulation.canary_experiment import CanaryExperiment, run_canary_experiment

pytestmark = pytest.mark.slow

SIGNIFICANCE = 1e-3


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> CanaryExperiment:
    from fedsilo.model.tiny import write_tiny_llama

    base = write_tiny_llama(tmp_path_factory.mktemp("attack-model") / "tiny", seed=0)
    # Memorisation on the tiny model hangs on float rounding near the edge: at 3 rounds the
    # second canary's exposure was 9.97 with the fused attention kernel and 4.11 with the plain
    # one (combined p 1.5e-5 against 6.2e-4); at 4 rounds, measured on one Intel Xeon with AMX,
    # fp32 eager gave p 4.1e-5, fp32 compiled 7.8e-5, bf16 eager 7.8e-5 and bf16 compiled
    # 3.6e-3 (exposures 1.3 and 9.97). So the test trains fp32 and eager, as the other tests
    # do (the same numbers on every CPU), for 6 rounds, where fp32 eager puts both canaries at
    # the largest exposure 1,000 candidates allow (9.97 each, p 1.5e-5; bf16 compiled: 7.8e-5).
    return CanaryExperiment(base_model=str(base), rounds=6, precision="fp32", compile="off")


def test_without_dp_planted_canaries_are_memorised(
    experiment: CanaryExperiment, tmp_path: Path
) -> None:
    outcome = run_canary_experiment(experiment, tmp_path, privacy={}, reporter=LogReporter())

    # Ten times below the level the DP test uses, so that test would catch DP that does nothing.
    assert outcome.planted_p_value < SIGNIFICANCE / 10, outcome
    assert outcome.never_inserted_p_value > SIGNIFICANCE, outcome
    assert outcome.membership_auc > 0.75, outcome


def test_with_record_level_dp_planted_canaries_look_never_seen(
    experiment: CanaryExperiment, tmp_path: Path
) -> None:
    privacy = {"record_level": True, "target_epsilon": 8.0, "max_grad_norm": 1.0, "delta": 1e-5}

    outcome = run_canary_experiment(experiment, tmp_path, privacy=privacy, reporter=LogReporter())

    assert outcome.epsilon is not None
    assert max(outcome.epsilon.values()) <= 8.0
    assert outcome.planted_p_value > SIGNIFICANCE, outcome
    assert outcome.never_inserted_p_value > SIGNIFICANCE, outcome
