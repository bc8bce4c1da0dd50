"""The distillation loss against hand-computed values and torch's own KL divergence."""

import math
from pathlib import Path

import pytest
import torch

from fedsilo.distill.loss import distillation_kl
from fedsilo.model.base import load_base_model


def test_matches_hand_computed_value_with_temperature_and_mask() -> None:
    # Position 0: teacher p = (1/2, 1/2); student logits (2 ln 3, 0) / T=2 give q = (3/4, 1/4).
    # KL(p || q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3). Position 1: identical logits, KL 0.
    # Position 2 is masked out (its KL would be large).
    teacher = torch.tensor([[0.0, 0.0], [1.0, -1.0], [9.0, -9.0]])
    student = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, -1.0], [-9.0, 9.0]])
    mask = torch.tensor([True, True, False])

    loss = distillation_kl(student, teacher, temperature=2.0, mask=mask)

    expected = 2.0**2 * (0.5 * math.log(4.0 / 3.0) + 0.0) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_matches_torch_kl_div_on_tiny_model_logits(tiny_model_dir: Path) -> None:
    model, _ = load_base_model(tiny_model_dir)
    ids = torch.tensor([[5, 9, 20, 33, 41, 7]])
    with torch.no_grad():
        student = model(input_ids=ids).logits[0]
        teacher = model(input_ids=ids.flip(1)).logits[0]
    temperature = 3.0

    loss = distillation_kl(student, teacher, temperature=temperature)

    reference = (
        torch.nn.functional.kl_div(
            torch.log_softmax(student / temperature, -1),
            torch.log_softmax(teacher / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    assert float(loss) > 0
    assert float(distillation_kl(teacher, teacher, temperature=temperature)) == pytest.approx(
        0, abs=1e-6
    )


def test_refuses_bad_input() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        distillation_kl(logits, logits, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        distillation_kl(logits, torch.zeros(2, 4), temperature=1.0)
    with pytest.raises(ValueError, match="no position"):
        distillation_kl(logits, logits, temperature=1.0, mask=torch.zeros(2, dtype=torch.bool))
