"""What left each site in a run, stated for a reader of the run's outputs.

A site's reply depends on the run's privacy settings, and this module states it for each:
without secure aggregation :mod:`fedsilo.client.app` sends the update in the clear with the
site's metrics (:class:`fedsilo.protocol.records.SiteMetrics`: all of them, or under
record-level DP only the precision and a count of 1) and, under DP, its DP event; under secure
aggregation (:mod:`fedsilo.client.secagg`) or homomorphic encryption (:mod:`fedsilo.client.he`)
the masked or encrypted update, no metrics, and the DP event where there is one. A change to
what a site sends must change this statement too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsilo.config import FedsiloConfig
from fedsilo.config.schema import SecureAggregationMode
from fedsilo.ledger import Entry, EntryKind
from fedsilo.server.report_provenance import (
    held_site_keys,
    recorded_config,
    recorded_he_tensors,
    run_setting,
)
from fedsilo.server.run_folder import RunFolder


@dataclass(frozen=True)
class Disclosure:
    """The settings that decide what a site sends with each round's update."""

    secure_aggregation: SecureAggregationMode
    record_level: bool  # DP-SGD at the site: DP event sent, metrics withheld
    site_level: bool  # noise on the sum: added by the coordinator, or by the sites before masking
    # Under "he": the tensors encrypted (empty: all; None: not established, a run_started
    # entry from before it was recorded there and a config.toml the ledger does not cover).
    he_tensors: tuple[str, ...] | None = ()


def disclosure_of(
    config: FedsiloConfig | None, start: Mapping[str, object], entries: Sequence[Entry]
) -> Disclosure | None:
    """The run's settings from ``config`` where the ledger's configuration digest covers it,
    else from the ledger (its run-start entry ``start`` and the DP events in ``entries``);
    None if neither says."""
    config = recorded_config(config, entries)
    if config is not None:
        return Disclosure(
            config.secure_aggregation.mode,
            record_level=config.privacy.record_level,
            site_level=config.privacy.site_level,
            he_tensors=config.secure_aggregation.he_tensors,
        )
    recorded = start.get("secure_aggregation")
    mode = next((known for known in _UPDATE if known == recorded), None)
    if mode is None:
        return None
    return Disclosure(
        mode,
        he_tensors=recorded_he_tensors(start),
        record_level=any(
            isinstance(e.payload.get("dp_event"), dict)
            for e in entries
            if e.kind is EntryKind.UPDATE_RECEIVED
        ),
        site_level=any(
            isinstance(e.payload.get("site_dp_event"), dict)
            for e in entries
            if e.kind is EntryKind.ROUND_AGGREGATED
        ),
    )


def _dp_sgd(settings: Disclosure) -> str:
    if not settings.record_level:
        return ""
    return ", trained with DP-SGD (per-example gradients clipped, Gaussian noise added)"


def _site_noise(settings: Disclosure) -> str:
    return (
        "clipped and noised with its share of the Gaussian noise, " if settings.site_level else ""
    )


def _in_clear(settings: Disclosure) -> str:
    update = (
        f"its adapter update (the change to the LoRA weights, fp32){_dp_sgd(settings)}, in the "
        "clear"
    )
    if settings.site_level:
        update += (
            "; the coordinator clipped each update and added Gaussian noise to their sum, so it "
            "saw each update before the noise"
        )
    return update


def _masked(settings: Disclosure) -> str:
    return (
        f"its adapter update{_dp_sgd(settings)}, {_site_noise(settings)}quantized to fixed "
        "point and masked: the coordinator received masked vectors only and learned the sum of "
        "each round's surviving sites' updates"
    )


def _encrypted(settings: Disclosure) -> str:
    if settings.he_tensors is None:
        which = (
            "encrypted in whole or in part (the ledger does not record which tensors, and "
            "config.toml is not the configuration it records; tensors not selected travelled "
            "in the clear)"
        )
    elif settings.he_tensors:
        which = (
            f"the tensors whose names contain {', '.join(settings.he_tensors)} encrypted (the "
            "others in the clear)"
        )
    else:
        which = "encrypted"
    return (
        f"its adapter update{_dp_sgd(settings)}, {_site_noise(settings)}{which} with CKKS "
        "homomorphic encryption under one secret key shared by the sites of the round: the "
        "coordinator added the ciphertexts and one site decrypted the sum and sent it back"
    )


_UPDATE: dict[SecureAggregationMode, Callable[[Disclosure], str]] = {
    "none": _in_clear,
    "secagg": _masked,
    "he": _encrypted,
}

_PROTOCOL_MESSAGES: dict[SecureAggregationMode, str | None] = {
    "none": None,
    "secagg": (
        "the protocol's messages: its public keys, secret shares for the other sites (each "
        "encrypted for its recipient), its signature on the set of surviving sites, and the "
        "shares that remove the masks from the sum"
    ),
    "he": (
        "the key ceremony's messages: its public keys and, from one site, the secret key "
        "sealed for each other site"
    ),
}

_ALL_METRICS = (
    "its number of training records, its mean training loss, the number of non-padding "
    "tokens it trained on, its training time in seconds, the share of padding in the "
    "positions it processed, and its compute precision (bf16 or fp32); the ledger keeps them "
    "with each update"
)
_DP_METRICS = (
    "its compute precision (bf16 or fp32) and, instead of its record count, the number 1 "
    "(updates weigh equally); no loss, token count, timing or padding share"
)
_NO_METRICS = (
    "no metrics: no record count (updates weigh equally), loss, token count, timing, padding "
    "share or compute precision"
)
_DP_EVENT = (
    "its DP-SGD event (noise multiplier, sampling rate, steps), from which its epsilon is "
    "computed; the sampling rate is the batch size divided by the site's record count (1 where "
    "it holds no more records than a batch), so it reveals that count"
)
_SIGNED = (
    "a declaration of the policy it trained under (the sha256 of its policy file, or none, and "
    "the smallest cohort it accepts) and its Ed25519 signatures binding the update, that "
    "declaration and the numbers above to the federation, run, round and site"
)


def _setting_lead(
    config: FedsiloConfig | None,
    entries: Sequence[Entry],
    run_dir: Path | None,
    sites: Sequence[str],
) -> str:
    setting = run_setting(config, entries)
    if setting == "deployment":
        return (
            "Each site ran its own SuperNode on its own records (a deployment: config.toml "
            "[deployment], covered by the ledger's configuration digest); its records, "
            "per-example values and gradients did not leave it. With each round's update a "
            "site sent the coordinator:"
        )
    if setting == "simulation" and config is not None:
        keys = (
            sorted(str(key) for key in held_site_keys(RunFolder(run_dir), config, sites))
            if run_dir is not None
            else []
        )
        held = (
            f"; and the run folder holds the sites' private signing keys ({', '.join(keys)}), "
            "so a site's signature here does not show that a separate party made it"
            if keys
            else ""
        )
        return (
            f"This run was a simulation on one machine (config.toml [run] engine = "
            f'"{config.run.engine}", no [deployment]; covered by the ledger\'s configuration '
            "digest): the coordinator's machine built every site's records and trained every "
            f"site, so nothing kept a site's records from the coordinator{held}. Each "
            "simulated site sent the coordinator, through the protocol a deployed site uses:"
        )
    return (
        "Whether the sites ran apart (a deployment) or on one machine (a simulation) is not "
        "established: config.toml cannot be read or does not match the configuration digest "
        "the ledger records. Through the protocol, each site sent the coordinator:"
    )


def enrolled_sites(start: Mapping[str, object]) -> list[str]:
    """The site names the run_started entry's payload ``start`` enrolls, sorted."""
    sites = start.get("sites")
    return sorted(str(name) for name in sites) if isinstance(sites, dict) else []


def what_left_the_sites(
    config: FedsiloConfig | None,
    start: Mapping[str, object],
    entries: Sequence[Entry],
    *,
    run_dir: Path | None = None,
) -> list[str]:
    """The Markdown section saying where each site's records were and what each site sent
    the coordinator in this run (settings as :func:`disclosure_of` finds them; unknown
    settings are said to be unknown, not guessed). ``run_dir`` is looked into for simulated
    sites' private keys."""
    heading = ["## What left each site", ""]
    settings = disclosure_of(config, start, entries)
    if settings is None:
        return [
            *heading,
            "Not stated: config.toml cannot be read or is not the configuration the ledger "
            "names by digest, and the ledger does not record the run's secure-aggregation mode.",
            "",
        ]
    mode = settings.secure_aggregation
    if mode != "none":
        numbers = _NO_METRICS
    else:
        numbers = _DP_METRICS if settings.record_level else _ALL_METRICS
    bullets = [
        _UPDATE[mode](settings),
        numbers,
        *([_DP_EVENT] if settings.record_level else []),
        _SIGNED,
        *([message] if (message := _PROTOCOL_MESSAGES[mode]) else []),
    ]
    lines = [
        *heading,
        _setting_lead(config, entries, run_dir, enrolled_sites(start)),
        "",
        *(f"- {bullet}" for bullet in bullets),
        "",
        "A site that refused a round or failed in it sent an error message or nothing; the "
        "ledger records each rejection with its reason (`update_rejected` entries).",
    ]
    trust = start.get("secure_aggregation_trust")
    if isinstance(trust, str) and trust:
        lines += [
            "",
            f"The run's ledger states who could see one site's update: \u201c{trust}\u201d.",
        ]
    return [*lines, ""]
