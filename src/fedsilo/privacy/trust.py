"""Who can see one site's update under each secure-aggregation mode, in one line.

The line is recorded in the run's ``run_started`` ledger entry (``secure_aggregation_trust``)
so that a report or an auditor states it next to the run, under the coordinator's signature.
docs/secure-aggregation.md gives the reasons and the tests.
"""

from __future__ import annotations

from fedsilo.config.schema import SecureAggregationMode

UPDATE_VISIBILITY: dict[SecureAggregationMode, str] = {
    "none": "no secure aggregation: the coordinator sees each site's update",
    "secagg": (
        "secure aggregation, no key holder: the coordinator sees only sums of at least threshold "
        "sites, even if it lies about dropouts, unless it forges the enrolment list or at least "
        "2 * threshold - n of the n sites collude with it; a coordinator that deviates can "
        "still subtract two sums whose cohorts differ in one site (across rounds, or a halted "
        "attempt retried with another cohort) to isolate that site's update, which only "
        "distributed DP bounds"
    ),
    "he": (
        "homomorphic encryption under ONE secret key shared by every site of the round (no "
        "threshold decryption): any single site colluding with the coordinator can decrypt every "
        "site's update; the decrypted sum is returned without noise flooding and the coordinator "
        "holds every input ciphertext, so it can attempt the key-recovery attack of Li and "
        "Micciancio (2021) without deviating from the protocol: HE does not protect updates from "
        "a curious coordinator; tensors not selected by he_tensors reach the coordinator site "
        "by site in the clear, under distributed DP with noise of only 1/sqrt(threshold) of "
        "the standard deviation the site-level epsilon assumes"
    ),
}


def update_visibility(mode: SecureAggregationMode) -> str:
    """The one-line statement for ``mode``."""
    return UPDATE_VISIBILITY[mode]
