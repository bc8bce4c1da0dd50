"""Admission of a site's reply: nothing in it is used before every check has passed.

The checks run cheapest-first and the payload is parsed last, after its size is bounded and its
signature verified, so a forged or oversized upload costs the coordinator a hash at most:
a site error; an update whose bytes (as they arrived, whatever shape they declare) exceed the
limit; an unknown or unpinned site; a binding for another federation, run, round or stage (a
replay); a second update from the same site in a round; a bad signature over the binding (which
holds the payload's digest); a payload that is not one bounded uint8 buffer; a digest that
differs from the signed one; tensor names, shapes or dtypes that do not fit the global adapter,
or NaN/inf; malformed metrics, or more examples than ``federation.max_site_examples``; a missing,
malformed or wrongly signed declaration of the site's policy (digest and minimum cohort); signed
claims that are missing, malformed, wrongly signed, or whose digest is not that of the metrics
and DP event received (so the numbers that weight an update and account its privacy are the
site's signed word, not anything a relay or the coordinator could change).

Any other failure while one site's reply is handled is a defect of ours, not of the round: the
collectors turn it into a rejection of that site (:func:`unexpected_failure`) and go on.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from flwr.app import Message, RecordDict

from fedsilo.config.schema import MAX_RECORD_NOISE_MULTIPLIER, MIN_RECORD_NOISE_MULTIPLIER
from fedsilo.crypto import (
    PublicKey,
    SignatureError,
    UpdateBinding,
    claims_sha256,
    sha256_hex,
    verify_claims,
    verify_policy_declaration,
    verify_update,
)
from fedsilo.model.adapters import AdapterState
from fedsilo.privacy.events import PoissonGaussianEvent, event_from_json, event_to_json
from fedsilo.protocol.records import (
    CLAIMS_KEY,
    DP_EVENT_KEY,
    METRICS_KEY,
    POLICY_KEY,
    SITE_KEY,
    UPDATE_KEY,
    ProtocolError,
    SignedClaims,
    SignedPolicy,
    SiteMetrics,
    adapter_from_payload,
    binding_from_record,
    check_array_size,
    payload_from_record,
)
from fedsilo.protocol.schedule import private_local_steps

log = logging.getLogger(__name__)


class UpdateRejectedError(Exception):
    """A reply that is not admitted; ``sender`` is the claimed site, or the node if unknown."""

    def __init__(self, sender: str, reason: str) -> None:
        super().__init__(f"{sender}: {reason}")
        self.sender = sender
        self.reason = reason


def unexpected_failure(error: Exception, *, what: str) -> str:
    """The one-line rejection reason for an error no check anticipated (logged in full)."""
    log.error("%s could not be processed", what, exc_info=error)
    lines = str(error).strip().splitlines() or [""]
    return f"{what} could not be processed: {type(error).__name__}: {lines[0][:200]}"


@dataclass(frozen=True)
class ExpectedBinding:
    """What a valid update in this round must be bound to."""

    federation_id: str
    run_id: str
    round: int
    stage: str


@dataclass(frozen=True)
class AdmittedUpdate:
    """A reply that passed every check."""

    node: int
    binding: UpdateBinding
    signature: bytes
    payload_size: int
    delta: AdapterState
    metrics: SiteMetrics
    dp_event: dict[str, str | int | float] | None  # the site's DP event, as ledgered
    policy: SignedPolicy  # the policy the site declares it trained under, as ledgered
    claims: SignedClaims  # the site's signature on its metrics and DP event, as ledgered


@dataclass(frozen=True)
class SignedUpload:
    """A reply whose payload is bounded, bound to this round and stage, and signed by its site."""

    node: int
    binding: UpdateBinding
    signature: bytes
    payload: bytes


def admit_signed(
    reply: Message,
    *,
    expected: ExpectedBinding,
    site_keys: Mapping[str, PublicKey],
    admitted_sites: Collection[str],
    max_bytes: int,
) -> SignedUpload:
    """The checks every upload passes, whatever its stage: up to and including the signature."""
    node = reply.metadata.src_node_id
    sender = f"node-{node}"
    if reply.has_error():
        raise UpdateRejectedError(sender, f"site error: {reply.error.reason}")
    content = reply.content
    if UPDATE_KEY not in content.array_records:
        raise UpdateRejectedError(sender, "the reply carries no update")
    record = content.array_records[UPDATE_KEY]
    try:
        for name in record:
            check_array_size(record[name], dtype="uint8", max_values=max_bytes, what="update")
        binding, signature = binding_from_record(content.config_records[SITE_KEY])
    except KeyError:
        raise UpdateRejectedError(sender, "the update is unsigned") from None
    except ProtocolError as error:
        raise UpdateRejectedError(sender, str(error)) from None
    # Until its signature verifies, the site id is only a claim: a rejection is named by the
    # node it came from, so that no site can get its bad replies ledgered in another's name.
    site = binding.site_id
    if site not in site_keys:
        raise UpdateRejectedError(sender, f"site {site!r} is not enrolled in this federation")
    try:
        verify_update(site_keys[site], binding, signature)
    except SignatureError as error:
        raise UpdateRejectedError(
            sender, f"bad signature for the claimed site {site!r}: {error}"
        ) from None
    _check_binding(binding, expected, site)
    if site in admitted_sites:
        raise UpdateRejectedError(
            site, f"duplicate: an update from {site} was already accepted in round {binding.round}"
        )
    try:
        payload = payload_from_record(record, max_bytes=max_bytes, what=f"update from {site}")
    except ProtocolError as error:
        raise UpdateRejectedError(site, str(error)) from None
    if sha256_hex(payload) != binding.payload_sha256:
        raise UpdateRejectedError(site, "the payload's sha256 differs from the signed digest")
    return SignedUpload(node, binding, signature, payload)


def admit_update(
    reply: Message,
    *,
    expected: ExpectedBinding,
    site_keys: Mapping[str, PublicKey],
    admitted_sites: Collection[str],
    like: AdapterState,
    max_bytes: int,
    max_examples: int,
    dp_required: DpRequirement | None = None,
) -> AdmittedUpdate:
    """Check one reply completely; raise UpdateRejectedError naming the sender and the reason."""
    upload = admit_signed(
        reply,
        expected=expected,
        site_keys=site_keys,
        admitted_sites=admitted_sites,
        max_bytes=max_bytes,
    )
    site, content = upload.binding.site_id, reply.content
    try:
        delta = adapter_from_payload(upload.payload, like=like, what=f"update from {site}")
        metrics = SiteMetrics.from_record(
            content.metric_records[METRICS_KEY], max_examples=max_examples
        )
    except KeyError:
        raise UpdateRejectedError(site, "the reply carries no metrics") from None
    except ProtocolError as error:
        raise UpdateRejectedError(site, str(error)) from None
    dp_event = check_dp_event(content, dp_required, site)
    check_withheld_metrics(metrics, dp_required, site)
    policy = check_policy_declaration(content, site_keys[site], upload.binding)
    claims = check_claims(
        content, site_keys[site], upload.binding, metrics=metrics, dp_event=dp_event
    )
    return AdmittedUpdate(
        upload.node,
        upload.binding,
        upload.signature,
        len(upload.payload),
        delta,
        metrics,
        dp_event,
        policy,
        claims,
    )


def check_withheld_metrics(
    metrics: SiteMetrics, dp_required: DpRequirement | None, site: str
) -> None:
    """Under record-level DP, refuse metrics other than :meth:`SiteMetrics.withheld`.

    Every private site weighs 1 in the mean (docs/privacy.md): a count would be unaccounted
    information about the site's data, and a large one would let one site set the global
    adapter alone.
    """
    if dp_required is not None and metrics != SiteMetrics.withheld(precision=metrics.precision):
        raise UpdateRejectedError(
            site,
            "under record-level DP a site reports no counts (num_examples 1, no loss, "
            f"tokens 0, seconds 0); it reported {metrics.claim_fields()}",
        )


def check_policy_declaration(
    content: RecordDict, key: PublicKey, binding: UpdateBinding
) -> SignedPolicy:
    """The policy digest and minimum cohort the site declares with its update (required),
    signed by the site together with the update's (already verified) ``binding``."""
    site = binding.site_id
    if POLICY_KEY not in content.config_records:
        raise UpdateRejectedError(site, "the update declares no site policy (digest, min_cohort)")
    try:
        policy = SignedPolicy.from_record(content.config_records[POLICY_KEY])
    except ProtocolError as error:
        raise UpdateRejectedError(site, str(error)) from None
    try:
        verify_policy_declaration(key, binding, policy.declaration.fields(), policy.signature)
    except SignatureError as error:
        reason = f"bad signature on the policy declaration: {error}"
        raise UpdateRejectedError(site, reason) from None
    return policy


def check_claims(
    content: RecordDict,
    key: PublicKey,
    binding: UpdateBinding,
    *,
    metrics: SiteMetrics | None,
    dp_event: Mapping[str, str | int | float] | None,
) -> SignedClaims:
    """The site's signature on the metrics and DP event decoded from its reply (required), over
    their digest (:func:`fedsilo.crypto.claims_sha256`) and the (already verified) ``binding``.

    The digest is recomputed from what was decoded, exactly as it is ledgered, so numbers
    changed on the way, or a DP event added, dropped or edited, do not match the site's word.
    """
    site = binding.site_id
    if CLAIMS_KEY not in content.config_records:
        raise UpdateRejectedError(site, "the update carries no signed claims (metrics, DP event)")
    try:
        claims = SignedClaims.from_record(content.config_records[CLAIMS_KEY])
    except ProtocolError as error:
        raise UpdateRejectedError(site, str(error)) from None
    try:
        verify_claims(key, binding, claims.claims_sha256, claims.signature)
    except SignatureError as error:
        raise UpdateRejectedError(site, f"bad signature on the claims: {error}") from None
    received = claims_sha256(
        metrics=None if metrics is None else metrics.claim_fields(), dp_event=dp_event
    )
    if received != claims.claims_sha256:
        raise UpdateRejectedError(
            site,
            f"the metrics and DP event received are not the ones {site} signed (claims sha256 "
            f"{received[:16]}..., signed {claims.claims_sha256[:16]}...)",
        )
    return claims


@dataclass(frozen=True)
class DpRequirement:
    """What a record-level DP update must declare: the round's steps, at least this much noise.

    Local work is ``local_steps`` steps, or ``local_epochs`` passes over the site's records
    (the other is 0, as in the round task); in epochs, the steps follow from the sampling rate
    the site declares (:func:`fedsilo.protocol.schedule.private_local_steps`).
    """

    local_steps: int
    local_epochs: float
    batch_size: int
    min_noise_multiplier: float  # 0 when each site calibrates its own noise to a target
    # The most records a site may hold (federation.max_site_examples): a sampling rate implying
    # more is refused, since in epochs it sets the steps the accountant composes every round.
    max_records: int

    def steps_for(self, event: PoissonGaussianEvent) -> int:
        """The steps ``event`` must declare, given the sampling rate it declares."""
        return private_local_steps(
            local_steps=self.local_steps,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            sampling_rate=event.sampling_rate,
        )


def check_dp_event(
    content: RecordDict, required: DpRequirement | None, site: str
) -> dict[str, str | int | float] | None:
    """The site's record-level DP event, checked against the round (None when DP is off)."""
    if required is None:
        return None
    if DP_EVENT_KEY not in content.config_records:
        raise UpdateRejectedError(site, "the round is differentially private; no DP event sent")
    raw = dict(content.config_records[DP_EVENT_KEY])
    try:
        event = event_from_json(raw)
    except (ValueError, TypeError) as error:
        raise UpdateRejectedError(site, f"malformed DP event: {error}") from None
    if not isinstance(event, PoissonGaussianEvent):
        raise UpdateRejectedError(site, f"DP event {type(event).__name__} is not DP-SGD")
    try:
        steps = required.steps_for(event)
    except ValueError as error:
        raise UpdateRejectedError(site, f"DP event: {error}") from None
    implied_records = round(required.batch_size / event.sampling_rate)
    if implied_records > required.max_records:
        raise UpdateRejectedError(
            site,
            f"DP event sampling rate {event.sampling_rate:g} at batch size "
            f"{required.batch_size} implies {implied_records} records; the federation allows "
            f"at most {required.max_records} per site",
        )
    if event.steps != steps:
        raise UpdateRejectedError(
            site, f"DP event declares {event.steps} steps; the round asked for {steps}"
        )
    if event.noise_multiplier < required.min_noise_multiplier:
        raise UpdateRejectedError(
            site,
            f"DP event noise multiplier {event.noise_multiplier:g} is below the round's "
            f"{required.min_noise_multiplier:g}",
        )
    low, high = MIN_RECORD_NOISE_MULTIPLIER, MAX_RECORD_NOISE_MULTIPLIER
    if not low <= event.noise_multiplier <= high:
        # Under a target epsilon the round asks for no minimum: the site calibrates its own.
        raise UpdateRejectedError(
            site,
            f"DP event noise multiplier {event.noise_multiplier:g} is outside [{low:g}, "
            f"{high:g}], the range fedsilo accounts",
        )
    return event_to_json(event)


def _check_binding(binding: UpdateBinding, expected: ExpectedBinding, site: str) -> None:
    claimed = (binding.federation_id, binding.run_id, binding.round, binding.stage)
    wanted = (expected.federation_id, expected.run_id, expected.round, expected.stage)
    if claimed != wanted:
        raise UpdateRejectedError(
            site,
            "replayed or stale update: signed for federation {}, run {}, round {}, stage {}; "
            "expected federation {}, run {}, round {}, stage {}".format(*claimed, *wanted),
        )
