"""The homomorphic-encryption requests as typed Flower records (server -> site).

Besides the secure-aggregation session record ("secagg", shared with :mod:`secagg_records`):
the key ceremony request carries the cohort's signed advertisements and the CKKS degree; the
encrypted-input request the dealer's signed advertisement, the secret context sealed for this
site, and the names selecting the encrypted tensors; the decryption request the contributors'
signed encrypted inputs. Replies are signed uploads, as in every secure stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from fedsilo.privacy.secagg.masking import SessionId
from fedsilo.privacy.secagg.messages import canonical_json
from fedsilo.protocol.records import ProtocolError
from fedsilo.protocol.secagg_records import SignedPayload

HE_KEY = "he"
KEYGEN_MESSAGE = "query.he_keygen"
ENCRYPTED_MESSAGE = "train.he"
DECRYPT_MESSAGE = "query.he_decrypt"
AGREE_MESSAGE = "query.he_agree"

KEYS_STAGE = "he-keys"
ENCRYPTED_STAGE = "he-encrypted"
DECRYPTED_STAGE = "he-decrypted"
AGREED_STAGE = "he-agreed"


def contributors_statement(session: SessionId, contributors: Iterable[str]) -> bytes:
    """What a site signs to agree on the round's contributors: the one set it will let be
    decrypted in ``session``. Like secagg's survivor statement, it names the session's key
    (federation, run, round and attempt): the signature's binding has no attempt, so a
    signature of an earlier attempt must not verify here."""
    return canonical_json({"session": session.key(), "contributors": sorted(set(contributors))})


def _str(record: ConfigRecord, name: str, what: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"{what}: field {name!r} is missing or not text")
    return value


def _bytes(record: ConfigRecord, name: str, what: str) -> bytes:
    value = record.get(name)
    if not isinstance(value, bytes):
        raise ProtocolError(f"{what}: field {name!r} is missing or not bytes")
    return value


def _int(record: ConfigRecord, name: str, what: str) -> int:
    value = record.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{what}: field {name!r} is missing or not an integer")
    return value


def _strings(record: ConfigRecord, name: str, what: str) -> tuple[str, ...]:
    value = record.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{what}: field {name!r} is missing or not a list of names")
    return tuple(str(v) for v in value)


def _blobs(record: ConfigRecord, name: str, what: str) -> tuple[bytes, ...]:
    value = record.get(name)
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise ProtocolError(f"{what}: field {name!r} is missing or not a list of bytes")
    return tuple(bytes(v) for v in value)  # type: ignore[arg-type]


def _record(content: RecordDict, what: str) -> ConfigRecord:
    if HE_KEY not in content.config_records:
        raise ProtocolError(f"{what}: no {HE_KEY!r} record")
    return content.config_records[HE_KEY]


def keygen_record(poly_modulus_degree: int) -> ConfigRecord:
    return ConfigRecord({"poly_modulus_degree": poly_modulus_degree})


POLY_MODULUS_DEGREES = (4096, 8192, 16384)
MAX_VALUES = 1 << 34  # adapter values in one decryption request: far beyond any LoRA adapter


def keygen_from_content(content: RecordDict) -> int:
    what = "the key ceremony request"
    degree = _int(_record(content, what), "poly_modulus_degree", what)
    if degree not in POLY_MODULUS_DEGREES:
        raise ProtocolError(f"{what}: poly_modulus_degree must be one of {POLY_MODULUS_DEGREES}")
    return degree


@dataclass(frozen=True)
class EncryptRequest:
    """What a site needs to encrypt its update under the ceremony's key."""

    dealer: SignedPayload  # the dealer's signed key advertisement
    # The dealer's signed key-ceremony payload, as the server received it: the public context
    # the server adds ciphertexts under and every site's sealed secret, so that a site can check
    # its secret against the one public context all sites and the server hold.
    dealer_keys: bytes
    dealer_keys_signature: bytes
    tensors: tuple[str, ...]  # substrings selecting the encrypted tensors; empty: all

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "dealer": self.dealer.site,
                "dealer_payload": self.dealer.payload,
                "dealer_signature": self.dealer.signature,
                "dealer_keys": self.dealer_keys,
                "dealer_keys_signature": self.dealer_keys_signature,
                "tensors": list(self.tensors),
            }
        )

    @property
    def signed_keys(self) -> SignedPayload:
        """The dealer's key-ceremony payload with its signature."""
        return SignedPayload(self.dealer.site, self.dealer_keys, self.dealer_keys_signature)

    @classmethod
    def from_content(cls, content: RecordDict) -> EncryptRequest:
        what = "the encrypted-input request"
        record = _record(content, what)
        dealer = SignedPayload(
            site=_str(record, "dealer", what),
            payload=_bytes(record, "dealer_payload", what),
            signature=_bytes(record, "dealer_signature", what),
        )
        return cls(
            dealer,
            _bytes(record, "dealer_keys", what),
            _bytes(record, "dealer_keys_signature", what),
            _strings(record, "tensors", what),
        )


@dataclass(frozen=True)
class AgreeRequest:
    """The contributor set the server proposes for decryption (every site that sent an
    accepted encrypted input)."""

    contributors: tuple[str, ...]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"contributors": list(self.contributors)})

    @classmethod
    def from_content(cls, content: RecordDict) -> AgreeRequest:
        what = "the contributor agreement request"
        return cls(_strings(_record(content, what), "contributors", what))


@dataclass(frozen=True)
class DecryptRequest:
    """The contributors' signed encrypted inputs, which the decrypting site adds itself.

    Each input is the exact payload a contributor signed for this session's encrypted-input
    stage, so the site decrypts a sum of the inputs of the sites it names, and nothing else:
    never one site's ciphertext presented as a sum."""

    inputs: tuple[SignedPayload, ...]
    length: int  # encrypted values in each input
    # site -> its signature over :func:`contributors_statement` of the inputs' sites
    agreement: tuple[tuple[str, bytes], ...] = ()

    @property
    def contributors(self) -> tuple[str, ...]:
        return tuple(signed.site for signed in self.inputs)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "contributors": [signed.site for signed in self.inputs],
                "payloads": [signed.payload for signed in self.inputs],
                "signatures": [signed.signature for signed in self.inputs],
                "length": self.length,
                "agreed_by": [site for site, _ in self.agreement],
                "agreement_signatures": [signature for _, signature in self.agreement],
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> DecryptRequest:
        what = "the decryption request"
        record = _record(content, what)
        length = _int(record, "length", what)
        if not 1 <= length <= MAX_VALUES:
            raise ProtocolError(f"{what}: length must be in [1, {MAX_VALUES}], got {length}")
        sites = _strings(record, "contributors", what)
        payloads = _blobs(record, "payloads", what)
        signatures = _blobs(record, "signatures", what)
        if not len(sites) == len(payloads) == len(signatures):
            raise ProtocolError(
                f"{what}: {len(sites)} contributors, {len(payloads)} payloads and "
                f"{len(signatures)} signatures"
            )
        inputs = tuple(map(SignedPayload, sites, payloads, signatures))
        signers = _strings(record, "agreed_by", what)
        agreement = _blobs(record, "agreement_signatures", what)
        if len(signers) != len(agreement):
            raise ProtocolError(f"{what}: {len(signers)} signers, {len(agreement)} signatures")
        return cls(inputs, length, tuple(zip(signers, agreement, strict=True)))
