"""The consistency check of Bonawitz et al. (CCS 2017, actively secure variant).

After the masked-input stage the server names the survivors U3 (the sites whose masked input
it holds). Each survivor signs one statement, "in this session the survivors are exactly U3",
with its Ed25519 identity key; the server forwards the signatures with the unmasking request.
A site reveals shares only if at least ``threshold`` enrolled sites signed the same U3: self-mask
seed shares for U3, mask-key shares for the sites outside it. Each site signs once per session,
so a server that tells different sites different survivor sets cannot gather ``threshold``
signatures on both a set with a site and a set without it (while ``2 * threshold`` exceeds the
cohort plus the colluding sites), and so never gets both secrets of one site.

The statement is signed as an :class:`~fedsilo.crypto.UpdateBinding` of stage
``secagg-consistency`` whose payload is :func:`survivor_statement`: the federation, run and
round are in the binding, the attempt and the set in the payload.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedsilo.crypto import UpdateBinding, sha256_hex
from fedsilo.privacy.secagg.masking import SessionId
from fedsilo.privacy.secagg.messages import canonical_json

CONSISTENCY_STAGE = "secagg-consistency"


def survivor_statement(session: SessionId, survivors: Iterable[str]) -> bytes:
    """The exact bytes a survivor signs: the session and the sorted survivor set."""
    return canonical_json({"session": session.key(), "survivors": sorted(set(survivors))})


def survivor_binding(session: SessionId, signer: str, survivors: Iterable[str]) -> UpdateBinding:
    """What ``signer`` signed if it agreed that ``survivors`` are this session's U3."""
    return UpdateBinding(
        federation_id=session.federation_id,
        run_id=session.run_id,
        round=session.round,
        stage=CONSISTENCY_STAGE,
        site_id=signer,
        payload_sha256=sha256_hex(survivor_statement(session, survivors)),
    )
