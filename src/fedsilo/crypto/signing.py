"""Domain-separated Ed25519 signatures over small records of named fields.

Every signature covers the bytes of :func:`canonical_bytes`: a fixed domain prefix, a purpose
(what kind of statement is signed) and the fields as canonical JSON. The purpose keeps a
signature made for one kind of statement from being accepted as another (an update signature
never verifies as a receipt); the domain prefix keeps fedsilo signatures apart from anything
else the same key might sign.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature

from fedsilo.crypto.keys import PrivateKey, PublicKey

DOMAIN = b"fedsilo/v1\n"
SIGNATURE_BYTES = 64
UPDATE_PURPOSE = "update"
RECEIPT_PURPOSE = "receipt"
POLICY_PURPOSE = "policy-declaration"
CLAIMS_PURPOSE = "update-claims"

_PURPOSE = re.compile(r"[a-z0-9-]+")


class SignatureError(Exception):
    """A signature that does not verify, or signature text that cannot be decoded."""


def canonical_bytes(purpose: str, fields: Mapping[str, str | int]) -> bytes:
    r"""The exact bytes that are signed for ``purpose`` and ``fields``.

    Recipe (what an independent verifier re-implements)::

        b"fedsilo/v1\n"
        + purpose, ASCII
        + b"\n"
        + the fields as one JSON object, ASCII

    where the JSON is Python's ``json.dumps(fields, sort_keys=True, separators=(",", ":"),
    ensure_ascii=True)``: keys sorted by code point, no whitespace, every non-ASCII character
    written as a lowercase ``\uXXXX`` escape (UTF-16 surrogate pairs above U+FFFF), the usual
    JSON escapes for ``"``, ``\`` and control characters, integers in plain decimal. No
    trailing newline. For example ``canonical_bytes("update", {"round": 3, "a": "é"})`` is
    the 42 bytes ``fedsilo/v1<LF>update<LF>{"a":"\u00e9","round":3}``.

    ``purpose`` must be non-empty ``[a-z0-9-]+``. Keys must be ``str`` and values ``str`` or
    ``int``; ``bool`` (an ``int`` in Python, ``true``/``false`` in JSON), ``float`` and
    anything else raise ``TypeError``, so each set of fields has a single encoding.
    """
    if not isinstance(purpose, str) or not _PURPOSE.fullmatch(purpose):
        raise ValueError(f"signature purpose {purpose!r}: must be non-empty [a-z0-9-]+")
    checked: dict[str, str | int] = {}
    for name, value in fields.items():
        if not isinstance(name, str):
            raise TypeError(f"field name {name!r}: must be str, got {type(name).__name__}")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise TypeError(f"field {name!r}: value must be str or int, got {type(value).__name__}")
        checked[name] = value
    body = json.dumps(checked, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return DOMAIN + purpose.encode("ascii") + b"\n" + body.encode("ascii")


def sign(key: PrivateKey, purpose: str, fields: Mapping[str, str | int]) -> bytes:
    """The 64-byte Ed25519 signature of :func:`canonical_bytes` for ``purpose`` and ``fields``."""
    return key.sign(canonical_bytes(purpose, fields))


def verify(key: PublicKey, purpose: str, fields: Mapping[str, str | int], signature: bytes) -> None:
    """Return if ``signature`` is ``key``'s signature of these fields, else raise.

    Raises :class:`SignatureError` for any mismatch, including a signature of the wrong length.
    """
    message = canonical_bytes(purpose, fields)
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        size = len(signature) if isinstance(signature, bytes) else type(signature).__name__
        raise SignatureError(
            f"{purpose} signature does not match: expected {SIGNATURE_BYTES} bytes, got {size}"
        )
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise SignatureError(
            f"{purpose} signature does not match the signed fields and public key"
        ) from None


@dataclass(frozen=True)
class UpdateBinding:
    """What a site's signature on one model update commits to.

    The update's payload is bound through its sha256 (see :func:`sha256_hex`) to the
    federation, run, round and protocol stage it was produced for, and to the sending site, so
    a signed update cannot be replayed into another round, run or federation, or claimed by
    another site.
    """

    federation_id: str
    run_id: str
    round: int
    stage: str
    site_id: str
    payload_sha256: str

    def fields(self) -> dict[str, str | int]:
        """The signed fields, named as the attributes."""
        return {
            "federation_id": self.federation_id,
            "run_id": self.run_id,
            "round": self.round,
            "stage": self.stage,
            "site_id": self.site_id,
            "payload_sha256": self.payload_sha256,
        }


@dataclass(frozen=True)
class Receipt:
    """The coordinator's signed acknowledgement that an update was accepted and ledgered.

    It covers the whole :class:`UpdateBinding` plus the ledger position (``ledger_seq``) and
    the hash of the ledger entry that records it (``entry_hash``).
    """

    binding: UpdateBinding
    ledger_seq: int
    entry_hash: str

    def fields(self) -> dict[str, str | int]:
        """The signed fields: the binding's fields plus ``ledger_seq`` and ``entry_hash``."""
        return {
            **self.binding.fields(),
            "ledger_seq": self.ledger_seq,
            "entry_hash": self.entry_hash,
        }


def sign_update(key: PrivateKey, binding: UpdateBinding) -> bytes:
    """A site's signature on ``binding`` (purpose ``"update"``)."""
    return sign(key, UPDATE_PURPOSE, binding.fields())


def verify_update(key: PublicKey, binding: UpdateBinding, signature: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is ``key``'s signature of ``binding``."""
    verify(key, UPDATE_PURPOSE, binding.fields(), signature)


def policy_declaration_fields(
    binding: UpdateBinding, declared: Mapping[str, str | int]
) -> dict[str, str | int]:
    """What a site's signature on its policy declaration covers: the update's binding (so the
    declaration belongs to that one update) and the declared fields."""
    fields = binding.fields()
    overlap = sorted(set(fields) & set(declared))
    if overlap:
        raise ValueError(f"a policy declaration may not redefine the binding's fields {overlap}")
    return {**fields, **declared}


def sign_policy_declaration(
    key: PrivateKey, binding: UpdateBinding, declared: Mapping[str, str | int]
) -> bytes:
    """A site's signature on the policy it declares with the update ``binding`` names."""
    return sign(key, POLICY_PURPOSE, policy_declaration_fields(binding, declared))


def verify_policy_declaration(
    key: PublicKey,
    binding: UpdateBinding,
    declared: Mapping[str, str | int],
    signature: bytes,
) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is ``key``'s signature of the
    declaration ``declared`` made with the update ``binding`` names."""
    verify(key, POLICY_PURPOSE, policy_declaration_fields(binding, declared), signature)


def claims_sha256(
    *, metrics: Mapping[str, object] | None, dp_event: Mapping[str, object] | None
) -> str:
    r"""The digest of what a site claims about one update: its metrics and its DP event.

    Recipe (what an auditor recomputes from an ``update_received`` ledger entry, whose
    ``site_metrics`` and ``dp_event`` fields hold exactly these two objects)::

        sha256_hex(json.dumps({"dp_event": dp_event, "metrics": metrics},
                              sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                              allow_nan=False).encode("ascii"))

    i.e. one JSON object with the two keys ``"dp_event"`` and ``"metrics"``, each the object
    as sent and ledgered or ``null`` when the update carries none (no DP event without
    record-level DP; no metrics under secure aggregation or HE), keys sorted by code point at
    every level, no whitespace, non-ASCII as ``\uXXXX``, integers in plain decimal and floats
    as Python writes them (the shortest text that reads back to the same double, always with a
    ``.`` or an exponent: ``0.0``, ``1e-05``), no NaN or infinity. The metrics object is
    :meth:`fedsilo.protocol.records.SiteMetrics.claim_fields`, the DP event that of
    :func:`fedsilo.privacy.events.event_to_json`. For example, with no metrics and no DP
    event the hashed text is the 32 bytes ``{"dp_event":null,"metrics":null}``.

    Raises ``ValueError`` for NaN or infinity and ``TypeError`` for a value JSON cannot hold.
    """
    text = json.dumps(
        {"dp_event": None if dp_event is None else dict(dp_event), "metrics": metrics},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )
    return sha256_hex(text.encode("ascii"))


def claims_fields(binding: UpdateBinding, claims_digest: str) -> dict[str, str | int]:
    """What a site's signature on its claims covers: the update's binding (so the claims belong
    to that one update) and ``claims_sha256`` (:func:`claims_sha256`)."""
    return {**binding.fields(), "claims_sha256": claims_digest}


def sign_claims(key: PrivateKey, binding: UpdateBinding, claims_digest: str) -> bytes:
    """A site's signature (purpose ``"update-claims"``) on the digest of the metrics and DP event
    it sends with the update ``binding`` names."""
    return sign(key, CLAIMS_PURPOSE, claims_fields(binding, claims_digest))


def verify_claims(
    key: PublicKey, binding: UpdateBinding, claims_digest: str, signature: bytes
) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is ``key``'s signature of the claims
    digest ``claims_digest`` made with the update ``binding`` names."""
    verify(key, CLAIMS_PURPOSE, claims_fields(binding, claims_digest), signature)


def sign_receipt(key: PrivateKey, receipt: Receipt) -> bytes:
    """The coordinator's signature on ``receipt`` (purpose ``"receipt"``)."""
    return sign(key, RECEIPT_PURPOSE, receipt.fields())


def verify_receipt(key: PublicKey, receipt: Receipt, signature: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is ``key``'s signature of ``receipt``."""
    verify(key, RECEIPT_PURPOSE, receipt.fields(), signature)


def sha256_hex(data: bytes) -> str:
    """Lowercase hex sha256 of ``data``: the digest used for payloads in bindings."""
    return hashlib.sha256(data).hexdigest()


def encode_signature(sig: bytes) -> str:
    """Standard padded base64 of a signature, for JSON and ledger storage."""
    return base64.b64encode(sig).decode("ascii")


def decode_signature(text: str) -> bytes:
    """Inverse of :func:`encode_signature`; raises :class:`SignatureError` on anything else.

    Only canonical base64 of exactly 64 bytes is accepted.
    """
    if not isinstance(text, str):
        raise SignatureError(f"signature text: must be str, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"signature text {text!r:.40}: not valid base64") from None
    if encode_signature(raw) != text:
        raise SignatureError(f"signature text {text!r:.40}: not canonical padded base64")
    if len(raw) != SIGNATURE_BYTES:
        raise SignatureError(f"signature text: {len(raw)} bytes, expected {SIGNATURE_BYTES}")
    return raw
