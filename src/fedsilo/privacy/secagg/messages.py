"""The protocol's parameters and payloads, with their exact byte forms.

Every payload a site uploads is canonical JSON (sorted keys, no whitespace, ASCII; bytes as
lowercase hex) or, for the masked input, the raw little-endian uint32 words, and is signed by
the site as an :class:`fedsilo.crypto.UpdateBinding` for its stage. Parsing refuses anything
that is not exactly the expected shape, naming the site it came from.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedsilo.privacy.distributed_dp import noise_share_std
from fedsilo.privacy.secagg.quantize import TAIL_SIGMAS, Quantization, plan_quantization
from fedsilo.privacy.secagg.shamir import SHARE_BYTES

ADVERTISE_STAGE = "secagg-advertise"
SHARE_STAGE = "secagg-share"
MASKED_STAGE = "secagg-masked"
UNMASK_STAGE = "secagg-unmask"

KEY_HEX = 64  # 32 bytes
SHARE_HEX = 2 * SHARE_BYTES


class SecAggMessageError(ValueError):
    """A secure-aggregation payload or parameter set that does not parse; names the source."""


@dataclass(frozen=True)
class SecAggParams:
    """What every party of one round must agree on (sent by the server, checked by sites).

    ``threshold``: shares needed to reconstruct a secret, so also the fewest inputs that are
    ever summed; ``cohort_size``: sites asked; ``clip``: per-coordinate quantization bound;
    ``dp_clip_norm`` / ``dp_noise_multiplier``: distributed DP (noise multiplier 0 = off).
    """

    threshold: int
    cohort_size: int
    clip: float
    dp_clip_norm: float
    dp_noise_multiplier: float

    def __post_init__(self) -> None:
        if not 2 <= self.threshold <= self.cohort_size:
            raise SecAggMessageError(
                f"secure aggregation needs 2 <= threshold <= cohort size, got threshold "
                f"{self.threshold} for {self.cohort_size} sites"
            )
        if self.cohort_size > MAX_SHARE_X:
            raise SecAggMessageError(f"a cohort of {self.cohort_size} sites is too large")
        if 2 * self.threshold <= self.cohort_size:
            raise SecAggMessageError(
                f"threshold {self.threshold} is not a majority of {self.cohort_size} sites"
            )
        values = (self.clip, self.dp_clip_norm, self.dp_noise_multiplier)
        if not all(math.isfinite(v) for v in values) or self.clip <= 0:
            raise SecAggMessageError("clip must be > 0 and every DP setting finite")
        if self.dp_noise_multiplier < 0 or self.dp_clip_norm < 0:
            raise SecAggMessageError("DP settings must be >= 0")
        # Both are checked before a site opens a session: found wrong after local training
        # they would fail the round with the site's DP spending already recorded.
        if self.distributed_dp and self.dp_clip_norm <= 0:
            raise SecAggMessageError(
                f"dp_clip_norm must be > 0 when dp_noise_multiplier is > 0 "
                f"(got dp_clip_norm {self.dp_clip_norm:g}, dp_noise_multiplier "
                f"{self.dp_noise_multiplier:g})"
            )
        try:
            scale = self.quantization().scale
        except (ValueError, OverflowError) as error:
            raise SecAggMessageError(
                f"clip {self.clip:g} with {self.cohort_size} sites and noise std "
                f"{self.noise_std_sum():g} has no usable quantization: {error}"
            ) from None
        if not (math.isfinite(scale) and scale > 0):
            raise SecAggMessageError(
                f"clip {self.clip:g} gives the quantization scale {scale:g}, not a finite "
                "positive number"
            )

    @property
    def distributed_dp(self) -> bool:
        return self.dp_noise_multiplier > 0

    def _noise_share_std(self) -> float:
        """The noise std each site adds (distributed DP on)."""
        return noise_share_std(
            noise_multiplier=self.dp_noise_multiplier,
            clip_norm=self.dp_clip_norm,
            threshold=self.threshold,
        )

    def noise_std_sum(self) -> float:
        """Std of the summed noise (update units) when all ``cohort_size`` sites contribute."""
        if not self.distributed_dp:
            return 0.0
        return self._noise_share_std() * math.sqrt(self.cohort_size)

    def sum_norm_bound(self, *, contributors: int, length: int) -> float | None:
        """The largest L2 norm the decoded sum of ``contributors`` honest inputs of ``length``
        values can have, but for a chance below 1e-31; None without distributed DP.

        Honest sites clip their update to ``dp_clip_norm`` (so the data sum is at most
        ``contributors * dp_clip_norm``) and add Gaussian noise; the norm of the summed noise,
        a Lipschitz function of it, exceeds ``std * (sqrt(length) + TAIL_SIGMAS)`` with
        probability below exp(-TAIL_SIGMAS^2 / 2). Rounding adds at most one ring unit per
        value and contributor (half for the data, half for the noise). The inputs arrive
        masked, so the server cannot check any one of them; a sum above this bound proves that
        some site sent an input it did not clip. Without distributed DP no site clips its
        update's norm, and the ring's range is the only bound."""
        if not self.distributed_dp:
            return None
        noise = (
            self._noise_share_std() * math.sqrt(contributors) * (math.sqrt(length) + TAIL_SIGMAS)
        )
        rounding = contributors * math.sqrt(length) / self.quantization().scale
        return contributors * self.dp_clip_norm + noise + rounding

    def quantization(self) -> Quantization:
        return plan_quantization(
            clip=self.clip, contributors=self.cohort_size, noise_std_sum=self.noise_std_sum()
        )

    def to_fields(self) -> dict[str, int | float]:
        return dict(asdict(self))

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> SecAggParams:
        try:
            return cls(
                threshold=_int(fields["threshold"]),
                cohort_size=_int(fields["cohort_size"]),
                clip=_float(fields["clip"]),
                dp_clip_norm=_float(fields["dp_clip_norm"]),
                dp_noise_multiplier=_float(fields["dp_noise_multiplier"]),
            )
        except (KeyError, TypeError) as error:
            raise SecAggMessageError(f"secure aggregation parameters: {error}") from None


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# Bounds on what a payload may hold before any of it is used: integers of at most this many
# digits (share x-coordinates are small; Python refuses beyond 4,300 digits with a ValueError),
# and share x-coordinates at most this large.
_MAX_INT_DIGITS = 20
MAX_SHARE_X = 2**16
_HEX = re.compile(r"[0-9a-f]*")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise SecAggMessageError(f"an integer of {len(text)} digits")
    return int(text)


def _no_constant(text: str) -> object:
    raise SecAggMessageError(f"{text} is not a number")


def _parse_object(payload: bytes, keys: set[str], what: str) -> dict[str, Any]:
    try:
        value = json.loads(
            payload.decode("ascii"), parse_int=_bounded_int, parse_constant=_no_constant
        )
    except SecAggMessageError as error:
        raise SecAggMessageError(f"{what}: not canonical JSON ({error})") from None
    except RecursionError:
        raise SecAggMessageError(f"{what}: JSON nested too deeply") from None
    except ValueError as error:  # also UnicodeDecodeError and JSONDecodeError
        raise SecAggMessageError(f"{what}: not canonical JSON ({error})") from None
    if not isinstance(value, dict) or set(value) != keys:
        raise SecAggMessageError(f"{what}: expected exactly the fields {sorted(keys)}")
    if canonical_json(value) != payload:
        raise SecAggMessageError(f"{what}: not in canonical form")
    return value


def _hex(value: object, length: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != length or not _HEX.fullmatch(value):
        raise SecAggMessageError(f"{what}: expected {length} lowercase hex digits")
    return bytes.fromhex(value)


def _share_x(value: object, what: str) -> int:
    if type(value) is not int or not 1 <= value <= MAX_SHARE_X:
        raise SecAggMessageError(f"{what}: a share's x must be an integer in [1, {MAX_SHARE_X}]")
    return value


@dataclass(frozen=True)
class Advertisement:
    """A site's two fresh X25519 public keys for one session, and a commitment to its seed.

    ``share_public`` encrypts the Shamir shares sent to this site; ``mask_public`` derives the
    pairwise masks; ``self_seed_sha256`` lets the server check a reconstructed self-mask seed.
    """

    site: str
    session: str
    share_public: bytes
    mask_public: bytes
    self_seed_sha256: bytes

    def to_payload(self) -> bytes:
        return canonical_json(
            {
                "site": self.site,
                "session": self.session,
                "share_public": self.share_public.hex(),
                "mask_public": self.mask_public.hex(),
                "self_seed_sha256": self.self_seed_sha256.hex(),
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, *, site: str, session: str) -> Advertisement:
        what = f"key advertisement of {site}"
        fields = {"site", "session", "share_public", "mask_public", "self_seed_sha256"}
        value = _parse_object(payload, fields, what)
        if value["site"] != site or value["session"] != session:
            raise SecAggMessageError(
                f"{what}: made for {value['site']!r} in session {value['session']!r}, "
                f"expected {site!r} in {session!r}"
            )
        return cls(
            site=site,
            session=session,
            share_public=_hex(value["share_public"], KEY_HEX, what),
            mask_public=_hex(value["mask_public"], KEY_HEX, what),
            self_seed_sha256=_hex(value["self_seed_sha256"], KEY_HEX, what),
        )


@dataclass(frozen=True)
class ShareBundle:
    """What one site secret-shares with one peer: its points of both sharing polynomials."""

    sender: str
    recipient: str
    x: int
    self_seed_share: bytes
    mask_key_share: bytes

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "sender": self.sender,
                "recipient": self.recipient,
                "x": self.x,
                "self_seed_share": self.self_seed_share.hex(),
                "mask_key_share": self.mask_key_share.hex(),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes, *, sender: str, recipient: str) -> ShareBundle:
        what = f"shares from {sender} to {recipient}"
        fields = {"sender", "recipient", "x", "self_seed_share", "mask_key_share"}
        value = _parse_object(raw, fields, what)
        if (value["sender"], value["recipient"]) != (sender, recipient):
            raise SecAggMessageError(
                f"{what}: addressed from {value['sender']!r} to {value['recipient']!r}"
            )
        return cls(
            sender=sender,
            recipient=recipient,
            x=_share_x(value["x"], what),
            self_seed_share=_hex(value["self_seed_share"], SHARE_HEX, what),
            mask_key_share=_hex(value["mask_key_share"], SHARE_HEX, what),
        )


def encode_sealed_map(sealed: Mapping[str, bytes]) -> bytes:
    """A site's share-stage upload: recipient -> sealed bundle (hex)."""
    return canonical_json({name: blob.hex() for name, blob in sealed.items()})


def decode_sealed_map(payload: bytes, *, site: str, recipients: set[str]) -> dict[str, bytes]:
    what = f"sealed shares from {site}"
    value = _parse_object(payload, recipients, what) if recipients else {}
    out: dict[str, bytes] = {}
    for name, text in value.items():
        if not isinstance(text, str) or len(text) % 2 or not _HEX.fullmatch(text):
            raise SecAggMessageError(f"{what}: entry for {name} is not lowercase hex")
        out[name] = bytes.fromhex(text)
    return out


@dataclass(frozen=True)
class UnmaskReply:
    """One site's shares for the unmasking: self-seed shares of survivors, key shares of dropouts.

    Each entry maps a site name to ``(x, y bytes)`` of the share this site holds for it.
    """

    self_seed_shares: dict[str, tuple[int, bytes]]
    mask_key_shares: dict[str, tuple[int, bytes]]

    def to_payload(self) -> bytes:
        def encode(shares: Mapping[str, tuple[int, bytes]]) -> dict[str, list[object]]:
            return {name: [x, y.hex()] for name, (x, y) in shares.items()}

        return canonical_json(
            {
                "self_seed_shares": encode(self.self_seed_shares),
                "mask_key_shares": encode(self.mask_key_shares),
            }
        )

    @classmethod
    def from_payload(
        cls, payload: bytes, *, site: str, survivors: set[str], dropped: set[str]
    ) -> UnmaskReply:
        what = f"unmasking shares from {site}"
        value = _parse_object(payload, {"self_seed_shares", "mask_key_shares"}, what)

        def decode(raw: object, names: set[str], kind: str) -> dict[str, tuple[int, bytes]]:
            if not isinstance(raw, dict) or set(raw) != names:
                raise SecAggMessageError(f"{what}: {kind} must cover exactly {sorted(names)}")
            out: dict[str, tuple[int, bytes]] = {}
            for name, item in raw.items():
                if not (isinstance(item, list) and len(item) == 2):
                    raise SecAggMessageError(f"{what}: {kind} entry for {name} is malformed")
                out[name] = (_share_x(item[0], what), _hex(item[1], SHARE_HEX, what))
            return out

        return cls(
            self_seed_shares=decode(value["self_seed_shares"], survivors, "self_seed_shares"),
            mask_key_shares=decode(value["mask_key_shares"], dropped, "mask_key_shares"),
        )
