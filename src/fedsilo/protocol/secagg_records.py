"""The secure-aggregation requests as typed Flower records (server -> site).

Every request carries the session and its parameters (ConfigRecord "secagg"); the stages add:
the cohort's signed key advertisements ("adverts"), the sealed shares relayed to one site
("shares", with the global adapter and round task of a train message), the survivor set to sign
("survivors"), or the sets to unmask ("unmask") with the survivors' signatures on their set
("survivor-signatures"). Replies are the usual signed upload (see
:func:`fedsilo.protocol.records.train_reply` without metrics): one uint8 payload and the site's
binding for the stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from fedsilo.crypto import UpdateBinding, sha256_hex
from fedsilo.privacy.secagg.masking import SessionId
from fedsilo.privacy.secagg.messages import SecAggParams
from fedsilo.protocol.records import (
    MAX_COUNT,
    MAX_NAME_CHARS,
    SITE_KEY,
    UPDATE_KEY,
    ProtocolError,
    binding_to_record,
    check_run_id,
    payload_to_record,
)

SECAGG_KEY = "secagg"
ADVERTS_KEY = "adverts"
SHARES_KEY = "shares"
UNMASK_KEY = "unmask"
SURVIVORS_KEY = "survivors"
SURVIVOR_SIGNATURES_KEY = "survivor-signatures"

ADVERTISE_MESSAGE = "query.secagg_advertise"
SHARE_MESSAGE = "query.secagg_share"
MASKED_MESSAGE = "train.secagg"
CONSISTENCY_MESSAGE = "query.secagg_consistency"
UNMASK_MESSAGE = "query.secagg_unmask"


def session_record(session: SessionId, params: SecAggParams) -> ConfigRecord:
    return ConfigRecord(
        {
            "federation_id": session.federation_id,
            "run_id": session.run_id,
            "round": session.round,
            "attempt": session.attempt,
            **params.to_fields(),
        }
    )


def session_from_content(content: RecordDict) -> tuple[SessionId, SecAggParams]:
    if SECAGG_KEY not in content.config_records:
        raise ProtocolError("the secure-aggregation request carries no session record")
    record = content.config_records[SECAGG_KEY]
    values = {name: record.get(name) for name in ("federation_id", "run_id", "round", "attempt")}
    if not (
        isinstance(values["federation_id"], str)
        and isinstance(values["run_id"], str)
        and type(values["round"]) is int
        and type(values["attempt"]) is int
    ):
        raise ProtocolError("the secure-aggregation session record lacks or mistypes its fields")
    session = SessionId(
        str(values["federation_id"]),
        str(values["run_id"]),
        int(values["round"]),
        int(values["attempt"]),
    )
    what = "the secure-aggregation session"
    check_run_id(session.run_id, what=what)
    if not 0 < len(session.federation_id) <= MAX_NAME_CHARS:
        raise ProtocolError(f"{what}: federation_id must hold 1 to {MAX_NAME_CHARS} characters")
    if not (0 <= session.round <= MAX_COUNT and 0 <= session.attempt <= MAX_COUNT):
        raise ProtocolError(f"{what}: round and attempt must be in [0, {MAX_COUNT}]")
    return session, SecAggParams.from_fields(dict(record))


@dataclass(frozen=True)
class SignedPayload:
    """A site's payload with its signature, as relayed by the server to other sites."""

    site: str
    payload: bytes
    signature: bytes

    def binding(self, session: SessionId, stage: str) -> UpdateBinding:
        """The binding the site must have signed for this payload in ``session``'s round."""
        return UpdateBinding(
            federation_id=session.federation_id,
            run_id=session.run_id,
            round=session.round,
            stage=stage,
            site_id=self.site,
            payload_sha256=sha256_hex(self.payload),
        )


def adverts_record(adverts: list[SignedPayload]) -> ConfigRecord:
    return ConfigRecord(
        {
            "sites": [a.site for a in adverts],
            "payloads": [a.payload for a in adverts],
            "signatures": [a.signature for a in adverts],
        }
    )


def adverts_from_content(content: RecordDict) -> list[SignedPayload]:
    record = content.config_records.get(ADVERTS_KEY)
    if record is None:
        raise ProtocolError("the key-sharing request carries no advertisements")
    sites, payloads, signatures = (record.get(k) for k in ("sites", "payloads", "signatures"))
    if not (
        isinstance(sites, list) and isinstance(payloads, list) and isinstance(signatures, list)
    ):
        raise ProtocolError("the advertisements record lacks its lists")
    if not len(sites) == len(payloads) == len(signatures):
        raise ProtocolError("the advertisements record has lists of different lengths")
    out: list[SignedPayload] = []
    for site, payload, signature in zip(sites, payloads, signatures, strict=True):
        if not (isinstance(site, str) and isinstance(payload, bytes)):
            raise ProtocolError("an advertisement is not (site name, payload bytes)")
        if not isinstance(signature, bytes):
            raise ProtocolError(f"the advertisement of {site} carries no signature bytes")
        out.append(SignedPayload(site, payload, signature))
    return out


def shares_record(sealed: dict[str, bytes]) -> ConfigRecord:
    return ConfigRecord({"senders": list(sealed), "sealed": list(sealed.values())})


def shares_from_content(content: RecordDict) -> dict[str, bytes]:
    record = content.config_records.get(SHARES_KEY)
    if record is None:
        raise ProtocolError("the masked-input request carries no relayed shares")
    senders, sealed = record.get("senders"), record.get("sealed")
    if not (isinstance(senders, list) and isinstance(sealed, list)) or len(senders) != len(sealed):
        raise ProtocolError("the relayed shares record is malformed")
    out: dict[str, bytes] = {}
    for sender, blob in zip(senders, sealed, strict=True):
        if not (isinstance(sender, str) and isinstance(blob, bytes)) or sender in out:
            raise ProtocolError("the relayed shares record is malformed")
        out[sender] = blob
    return out


def unmask_record(survivors: list[str], dropped: list[str]) -> ConfigRecord:
    return ConfigRecord({"survivors": sorted(survivors), "dropped": sorted(dropped)})


def unmask_from_content(content: RecordDict) -> tuple[set[str], set[str]]:
    record = content.config_records.get(UNMASK_KEY)
    if record is None:
        raise ProtocolError("the unmasking request names no survivors")
    survivors, dropped = record.get("survivors"), record.get("dropped")
    if not (isinstance(survivors, list) and isinstance(dropped, list)):
        raise ProtocolError("the unmasking request is malformed")
    if not all(isinstance(n, str) for n in [*survivors, *dropped]):
        raise ProtocolError("the unmasking request is malformed")
    return {str(n) for n in survivors}, {str(n) for n in dropped}


def survivors_record(survivors: list[str]) -> ConfigRecord:
    return ConfigRecord({"survivors": sorted(survivors)})


def survivors_from_content(content: RecordDict) -> set[str]:
    """The survivor set U3 a consistency request asks the site to sign."""
    record = content.config_records.get(SURVIVORS_KEY)
    if record is None:
        raise ProtocolError("the consistency request names no survivors")
    survivors = record.get("survivors")
    if not isinstance(survivors, list) or not all(isinstance(n, str) for n in survivors):
        raise ProtocolError("the consistency request's survivors are not a list of site names")
    if len(set(survivors)) != len(survivors):
        raise ProtocolError("the consistency request names a survivor twice")
    return {str(n) for n in survivors}


def survivor_signatures_record(signatures: dict[str, bytes]) -> ConfigRecord:
    names = sorted(signatures)
    return ConfigRecord({"sites": names, "signatures": [signatures[n] for n in names]})


def survivor_signatures_from_content(content: RecordDict) -> dict[str, bytes]:
    """The survivors' signatures on the survivor set, forwarded with the unmasking request."""
    record = content.config_records.get(SURVIVOR_SIGNATURES_KEY)
    if record is None:
        raise ProtocolError("the unmasking request carries no signatures on the survivor set")
    sites, signatures = record.get("sites"), record.get("signatures")
    if not (isinstance(sites, list) and isinstance(signatures, list)) or len(sites) != len(
        signatures
    ):
        raise ProtocolError("the survivor signatures record is malformed")
    out: dict[str, bytes] = {}
    for site, signature in zip(sites, signatures, strict=True):
        if not (isinstance(site, str) and isinstance(signature, bytes)) or site in out:
            raise ProtocolError("the survivor signatures record is malformed")
        out[site] = signature
    return out


def signed_reply(payload: bytes, binding: UpdateBinding, signature: bytes) -> RecordDict:
    """A site's reply in any secure-aggregation stage: the payload and its signed binding."""
    return RecordDict(
        {UPDATE_KEY: payload_to_record(payload), SITE_KEY: binding_to_record(binding, signature)}
    )
