"""A site's own policy: what it accepts to train on, enforced by the installed client.

The policy file lives on the site and is never sent by the server. Before touching any data the
client checks each round task against it and refuses, with a reason that reaches the server as
a refusal, anything outside it: another federation, another base model, a cohort too small to
hide in, hyperparameters outside the allowed ranges.

    [accept]
    federation_id = "cardio-pilot"
    base_model_hash = "sha256:..."        # optional; when set, any other base model is refused
    aggregation = "secagg"                # optional: "any" (default), "secagg" or "he"

    [limits]
    min_cohort = 3                        # refuse rounds that sum fewer sites than this
    learning_rate = [1e-5, 1e-2]          # inclusive ranges
    local_steps = [1, 200]                # also bounds the steps a local_epochs task comes to
    local_epochs = [0.1, 10]
    batch_size = [1, 64]
    max_length = [8, 2048]
    lora_rank = [1, 32]
    lora_alpha = [1, 64]
    lora_dropout = [0, 0.1]
    lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj"]   # optional: any linear layer

    [privacy]
    max_epsilon = 8.0                     # the site's record-level DP budget, at this delta:
    delta = 1e-5                          # with it, every round must be record-level private
    min_distributed_noise_multiplier = 1.0   # optional (default 0: no floor): refuse secure
                                          # rounds whose distributed DP noise is below this,
                                          # and rounds that send the update in the clear

A deployed site (``fedsilo site start POLICY``) also says who it is, where its data and keys
are, where the coordinator is, and which app bundles it accepts:

    [site]
    name = "st-mary"                      # as enrolled with the coordinator
    data = "records.jsonl"                # JSONL, CSV or Parquet (text, or prompt/response)
    base_model = "smollm2-135m-instruct"  # or a local Hugging Face folder
    keys_dir = "keys"                     # NAME.key and NAME.node.key from `fedsilo certs site`
    passphrase_file = "keys/passphrase"   # optional; else $FEDSILO_KEY_PASSPHRASE decrypts NAME.key
    state_dir = "state"                   # receipts, privacy spending, logs

    [connect]
    coordinator = "coordinator.example.org:9443"
    ca_cert = "keys/ca.pem"               # the federation's CA (verifies the coordinator)
    coordinator_key = "keys/coordinator-signing.pub"   # verifies receipts

    [code]
    bundles = ["sha256:..."]              # optional: refuse runs submitted with other bundles

Relative paths are resolved from the policy file's folder.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from fedsilo.config.schema import CompileSetting, PrecisionSetting
from fedsilo.crypto import sha256_hex
from fedsilo.ledger.entries import payload_json
from fedsilo.protocol.records import MAX_MIN_COHORT, LoraSpec, PolicyDeclaration, RoundTask
from fedsilo.storage import read_regular_file

log = logging.getLogger(__name__)


MAX_POLICY_BYTES = 1024 * 1024
"""Largest policy file read: a policy is a few dozen lines."""


class PolicyError(ValueError):
    """A policy file that cannot be used; names the file and the field."""


class TaskRefusedError(RuntimeError):
    """The site will not run this round task; the reason reaches the server as an error."""


class _Section(BaseModel):
    # A bound of NaN or infinity would pass every ordering check and then refuse, or allow,
    # everything: numbers are finite wherever a policy gives one.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


UpdateChannel = Literal["clear", "secagg", "he"]
"""How a site's update leaves it: in the clear, masked (secure aggregation) or encrypted (HE)."""


class AcceptSection(_Section):
    """Which federation and base model this site works with, and how its updates may leave.

    ``aggregation``: "any" accepts every mode the coordinator runs; "secagg" or "he" make the
    site refuse to train for any other, so a coordinator cannot downgrade a run to updates in
    the clear (under "he", a tensor the round leaves in the clear must be unchanged by
    training, as FFA-LoRA's frozen A)."""

    federation_id: str = Field(min_length=1)
    base_model_hash: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$")
    aggregation: Literal["any", "secagg", "he"] = "any"


# A range's bounds are numbers as written, never strings or booleans coerced, and not negative.
Bound = Annotated[float, Strict(), AllowInfNan(False), Field(ge=0)]
Range = tuple[Bound, Bound]


class LimitsSection(_Section):
    """Inclusive ranges the round task's hyperparameters must fall in."""

    min_cohort: int = Field(1, ge=1, le=MAX_MIN_COHORT, strict=True)
    learning_rate: Range = (1e-6, 1e-1)
    local_steps: Range = (1, 1000)
    local_epochs: Range = (0, 1000)
    batch_size: Range = (1, 256)
    max_length: Range = (8, 8192)
    lora_rank: Range = (1, 256)
    lora_alpha: Range = (1e-3, 1024.0)
    lora_dropout: Range = (0.0, 0.5)
    # The module names (last name component, as peft matches them) the site trains an adapter
    # on; None: any linear layer of the base model.
    lora_targets: tuple[Annotated[str, Field(min_length=1)], ...] | None = Field(None, min_length=1)
    # The largest message (global adapter and task) this site accepts to load.
    max_payload_bytes: int = Field(256 * 1024 * 1024, ge=1, strict=True)

    @model_validator(mode="after")
    def _ranges_ordered(self) -> LimitsSection:
        ranges = ("learning_rate", "local_steps", "local_epochs", "batch_size", "max_length")
        for name in (*ranges, "lora_rank", "lora_alpha", "lora_dropout"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: lower bound {low} exceeds upper bound {high}")
        return self


class PrivacySection(_Section):
    """The site's privacy rules: its record-level DP budget, and a floor on distributed DP.

    ``max_epsilon`` and ``delta`` (both or neither) are the budget every round's record-level
    DP-SGD is composed against; with them the site refuses any round that is not record-level
    private. ``min_distributed_noise_multiplier`` (0: no floor) is the smallest distributed DP
    noise multiplier the site accepts (the coordinator chooses it, as ``site_noise_multiplier``):
    a secure round announcing less, or none, is refused before the site makes its keys, and
    with a floor above 0 a round that would send the update in the clear is refused as well."""

    max_epsilon: float | None = Field(None, gt=0, strict=True)
    delta: float | None = Field(None, gt=0, lt=1, strict=True)
    min_distributed_noise_multiplier: float = Field(0.0, ge=0, strict=True)

    @model_validator(mode="after")
    def _budget_whole(self) -> PrivacySection:
        if (self.max_epsilon is None) != (self.delta is None):
            raise ValueError("max_epsilon and delta: give both (a budget) or neither")
        return self


class SiteSection(_Section):
    """Who this site is and what it holds (deployment)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    data: Path
    base_model: str = "smollm2-135m-instruct"
    system_prompt: str | None = None
    keys_dir: Path = Path(".")
    # The signing key's passphrase (a 0600 file); without it $FEDSILO_KEY_PASSPHRASE is read.
    passphrase_file: Path | None = None
    state_dir: Path = Path("state")
    torch_threads: int = Field(1, ge=1)
    # The site's own choice of compute precision on its hardware (the coordinator's
    # train.precision does not apply to a deployed site).
    precision: PrecisionSetting = "auto"
    # Likewise whether its plain training runs through torch.compile (needs a C++ compiler).
    compile: CompileSetting = "auto"


class ConnectSection(_Section):
    """Where the coordinator is and how this site recognises it (deployment)."""

    coordinator: str = Field(pattern=r"^[^\s/]+:[0-9]{1,5}$")
    ca_cert: Path
    coordinator_key: Path
    # Secure aggregation: a folder of the federation's pinned site public keys, NAME.pub each
    # (as `fedsilo keys init` writes them); peers' key advertisements are verified against them.
    peers: Path | None = None


class CodeSection(_Section):
    """Which app bundles (FABs) this site accepts runs for; empty: any (none is executed)."""

    bundles: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _hash_form(self) -> CodeSection:
        for value in self.bundles:
            digits = value.removeprefix("sha256:")
            if digits == value or len(digits) != 64 or digits.strip("0123456789abcdef"):
                raise ValueError(f"bundles: {value!r} is not of the form sha256:<64 hex digits>")
        return self


class SitePolicy(_Section):
    """A site's policy file."""

    accept: AcceptSection
    limits: LimitsSection = LimitsSection()
    privacy: PrivacySection | None = None
    site: SiteSection | None = None
    connect: ConnectSection | None = None
    code: CodeSection = CodeSection()


# The sections that say what a site accepts; [site] and [connect] say where its files and its
# coordinator are (paths resolved on each machine), so they are left out of its digest.
_RULE_SECTIONS = ("accept", "limits", "privacy", "code")


def policy_digest(policy: SitePolicy) -> str:
    """The sha256 (hex) of the policy's rules in canonical form.

    The validated [accept], [limits], [privacy] and [code] sections, every default filled in,
    are written as canonical JSON (the ledger's recipe, :func:`payload_json`), so two files that
    state the same rules (in another order, with other comments, or leaving a default out)
    have the same digest, and any change to a rule changes it.
    """
    rules = policy.model_dump(mode="json", include=set(_RULE_SECTIONS))
    # A rule added later, at its default, is left out: a policy written before it existed
    # keeps the digest its runs' ledgers record.
    if policy.accept.aggregation == "any":
        del rules["accept"]["aggregation"]
    defaults = LimitsSection().model_dump(mode="json")
    for name in ("lora_alpha", "lora_dropout", "lora_targets"):
        if rules["limits"][name] == defaults[name]:
            del rules["limits"][name]
    if policy.privacy is not None:
        privacy = {
            name: value
            for name, value in rules["privacy"].items()
            if value is not None and (name, value) != ("min_distributed_noise_multiplier", 0.0)
        }
        rules["privacy"] = privacy or None  # an empty [privacy] states no rule
    return sha256_hex(payload_json(rules).encode("ascii"))


def declare_policy(policy: SitePolicy | None) -> PolicyDeclaration:
    """What a site declares with each update about the policy it trained under."""
    if policy is None:
        return PolicyDeclaration(policy_sha256=None, min_cohort=1)
    return PolicyDeclaration(policy_digest(policy), policy.limits.min_cohort)


def resolve_policy_paths(policy: SitePolicy, *, base: Path) -> SitePolicy:
    """The policy with its relative paths taken from ``base`` (the policy file's folder)."""
    updates: dict[str, object] = {}
    if policy.site is not None:
        site = policy.site
        base_model = site.base_model
        if "/" in base_model or base_model.startswith("."):
            base_model = str(base / base_model)
        updates["site"] = site.model_copy(
            update={
                "data": base / site.data,
                "keys_dir": base / site.keys_dir,
                "passphrase_file": None
                if site.passphrase_file is None
                else base / site.passphrase_file,
                "state_dir": base / site.state_dir,
                "base_model": base_model,
            }
        )
    if policy.connect is not None:
        connect = policy.connect
        updates["connect"] = connect.model_copy(
            update={
                "ca_cert": base / connect.ca_cert,
                "coordinator_key": base / connect.coordinator_key,
                "peers": None if connect.peers is None else base / connect.peers,
            }
        )
    return policy.model_copy(update=updates)


def load_policy(path: Path) -> SitePolicy:
    """Read and validate a policy file; errors name the file and the field."""
    try:
        text = read_regular_file(Path(path), limit=MAX_POLICY_BYTES).decode("utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise PolicyError(f"{path}: site policy file not found") from None
    except OSError as error:
        raise PolicyError(f"{path}: cannot be read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise PolicyError(f"{path}: not UTF-8 text ({error.reason})") from None
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"{path}: not valid TOML: {error}") from None
    except ValueError as error:  # not a regular file, or too large
        raise PolicyError(str(error)) from None
    try:
        return SitePolicy.model_validate(data)
    except ValidationError as error:
        problems = [
            f"  {'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
        ]
        raise PolicyError(f"{path}: invalid site policy\n" + "\n".join(problems)) from None


def check_task(
    policy: SitePolicy, task: RoundTask, *, site: str, num_examples: int | None = None
) -> None:
    """Raise TaskRefusedError naming the first rule ``task`` breaks; return if it keeps them all.

    A task set in epochs is held to the ``local_epochs`` range, and, given the site's
    ``num_examples``, the steps it comes to are held to the ``local_steps`` range. That step
    count depends on the site's record count, which the refusal must not tell the coordinator:
    it names the epochs, the batch size and the policy's bound, and the count is only logged.
    """
    accept, limits = policy.accept, policy.limits
    if task.federation_id != accept.federation_id:
        raise TaskRefusedError(
            f"site {site}: policy accepts federation {accept.federation_id!r}, "
            f"not {task.federation_id!r}"
        )
    if accept.base_model_hash is not None and task.base_model_hash != accept.base_model_hash:
        raise TaskRefusedError(
            f"site {site}: policy accepts base model {accept.base_model_hash}, "
            f"not {task.base_model_hash}"
        )
    if task.cohort_size < limits.min_cohort:
        raise TaskRefusedError(
            f"site {site}: the round sums {task.cohort_size} sites; policy requires at least "
            f"{limits.min_cohort}"
        )
    values: dict[str, float] = {
        "learning_rate": task.learning_rate,
        "batch_size": task.batch_size,
        "max_length": task.max_length,
    }
    if task.local_epochs > 0:
        values["local_epochs"] = task.local_epochs
    else:
        values["local_steps"] = task.local_steps
    for name, value in values.items():
        low, high = getattr(limits, name)
        if not low <= value <= high:
            raise TaskRefusedError(
                f"site {site}: {name}={value} is outside the policy's range [{low:g}, {high:g}]"
            )
    if task.local_epochs > 0 and num_examples is not None:
        _check_epoch_steps(limits, task, site=site, num_examples=num_examples)


def _check_epoch_steps(
    limits: LimitsSection, task: RoundTask, *, site: str, num_examples: int
) -> None:
    steps = task.steps_for(num_examples)
    low, high = limits.local_steps
    if low <= steps <= high:
        return
    # The count stays in the site's own log: the coordinator could divide it back into records.
    log.info(
        "site %s: local_epochs=%g at batch_size=%d comes to %d local steps over its %d records, "
        "outside the policy's local_steps range [%g, %g]",
        site,
        task.local_epochs,
        task.batch_size,
        steps,
        num_examples,
        low,
        high,
    )
    bound = f"more local steps than the policy's maximum of {high:g}"
    if steps < low:
        bound = f"fewer local steps than the policy's minimum of {low:g}"
    raise TaskRefusedError(
        f"site {site}: local_epochs={task.local_epochs:g} at batch_size={task.batch_size} comes "
        f"to {bound} (local_steps)"
    )


def check_distributed_dp(policy: SitePolicy | None, noise_multiplier: float, *, site: str) -> None:
    """Raise TaskRefusedError if the round's distributed DP noise multiplier (0: none) is below
    the policy's ``[privacy] min_distributed_noise_multiplier``."""
    privacy = policy.privacy if policy is not None else None
    floor = privacy.min_distributed_noise_multiplier if privacy is not None else 0.0
    if noise_multiplier < floor:
        raise TaskRefusedError(
            f"site {site}: the round's distributed DP noise multiplier is {noise_multiplier:g}; "
            f"the policy's [privacy] min_distributed_noise_multiplier is {floor:g}"
        )


def check_lora(policy: SitePolicy, lora: LoraSpec, *, site: str) -> None:
    """Raise TaskRefusedError if the round's adapter (rank, alpha, dropout, target modules) is
    outside the policy's limits: the coordinator chooses the adapter, the site bounds what it
    trains and sends."""
    limits = policy.limits
    for name, value in (
        ("lora_rank", lora.rank),
        ("lora_alpha", lora.alpha),
        ("lora_dropout", lora.dropout),
    ):
        low, high = getattr(limits, name)
        if not low <= value <= high:
            raise TaskRefusedError(
                f"site {site}: {name}={value:g} is outside the policy's range [{low:g}, {high:g}]"
            )
    allowed = limits.lora_targets
    if allowed is not None and (refused := sorted(set(lora.target_modules) - set(allowed))):
        raise TaskRefusedError(
            f"site {site}: LoRA target_modules {refused} are not in the policy's lora_targets "
            f"{list(allowed)}"
        )


def check_bundle(policy: SitePolicy, bundle_sha256: str, *, site: str) -> None:
    """Raise TaskRefusedError unless the run's app bundle is allowed (any, when none is pinned)."""
    allowed = policy.code.bundles
    if allowed and bundle_sha256 not in allowed:
        raise TaskRefusedError(
            f"site {site}: the run was submitted with app bundle {bundle_sha256}, which this "
            f"site's policy does not allow ([code] bundles = {list(allowed)})"
        )


def check_channel(policy: SitePolicy, channel: UpdateChannel, *, site: str) -> None:
    """Raise TaskRefusedError if the policy does not let an update leave through ``channel``:
    another mode than its ``aggregation``, or in the clear (where the site adds no distributed
    DP noise) under a ``min_distributed_noise_multiplier`` above 0."""
    wanted = policy.accept.aggregation
    if wanted != "any" and channel != wanted:
        said = {"clear": "in the clear", "secagg": "under secure aggregation", "he": "under HE"}
        raise TaskRefusedError(
            f"site {site}: the round asks for this site's update {said[channel]}; the policy "
            f"accepts only aggregation = {wanted!r}"
        )
    floor = policy.privacy.min_distributed_noise_multiplier if policy.privacy else 0.0
    if channel == "clear" and floor > 0:
        raise TaskRefusedError(
            f"site {site}: the round asks for this site's update in the clear, with no "
            f"distributed DP noise; the policy's [privacy] min_distributed_noise_multiplier "
            f"is {floor:g}"
        )


def check_nothing_in_clear(
    policy: SitePolicy,
    delta: Mapping[str, torch.Tensor],
    in_clear: Callable[[str], bool],
    *,
    site: str,
) -> None:
    """Under a policy that requires HE, or a distributed DP noise floor, refuse an update a
    tensor of which training changed and the round would send in the clear (its
    ``he_tensors`` leave that tensor out): such a tensor leaves with this site's noise share
    alone, a fraction of the noise the floor asks the sum to carry."""
    floor = policy.privacy.min_distributed_noise_multiplier if policy.privacy else 0.0
    if policy.accept.aggregation == "any" and floor == 0:
        return
    changed = sorted(n for n, t in delta.items() if in_clear(n) and bool(torch.any(t != 0)))
    if not changed:
        return
    rule = (
        f"aggregation = {policy.accept.aggregation!r}"
        if policy.accept.aggregation != "any"
        else f"[privacy] min_distributed_noise_multiplier = {floor:g}"
    )
    raise TaskRefusedError(
        f"site {site}: the round would send {len(changed)} trained tensor(s) in the clear "
        f"(e.g. {changed[0]}); the policy accepts only {rule}"
    )
