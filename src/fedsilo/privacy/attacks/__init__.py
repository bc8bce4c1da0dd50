"""Attacks that measure what a trained model leaks about its training records.

- :mod:`~fedsilo.privacy.attacks.canary`: exposure of planted canaries (secret memorisation).
- :mod:`~fedsilo.privacy.attacks.membership`: loss-threshold membership inference (AUC).
"""

from fedsilo.privacy.attacks.canary import (
    CANARY_PROMPT,
    CANARY_TEMPLATE,
    Canary,
    LogLikelihood,
    candidate_secrets,
    exposure,
    exposure_from_log_likelihoods,
    exposure_p_value,
    exposure_with,
    make_canaries,
    plant,
    sequence_log_likelihood,
)
from fedsilo.privacy.attacks.membership import (
    loss_threshold_auc,
    loss_threshold_auc_ci,
    membership_auc,
    membership_losses,
)

__all__ = [
    "CANARY_PROMPT",
    "CANARY_TEMPLATE",
    "Canary",
    "LogLikelihood",
    "candidate_secrets",
    "exposure",
    "exposure_from_log_likelihoods",
    "exposure_p_value",
    "exposure_with",
    "loss_threshold_auc",
    "loss_threshold_auc_ci",
    "make_canaries",
    "membership_auc",
    "membership_losses",
    "plant",
    "sequence_log_likelihood",
]
