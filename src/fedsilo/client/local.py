"""A site's local step of a round: check the task against its rules, train, sign what it sends."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import Context, Message

from fedsilo.client.policy import (
    TaskRefusedError,
    UpdateChannel,
    check_channel,
    check_nothing_in_clear,
    check_task,
    declare_policy,
)
from fedsilo.client.privacy_budget import (
    check_budget,
    plan_round_event,
    read_spent,
    record_spent,
)
from fedsilo.client.receipts import remember_sent
from fedsilo.client.site import Site, SiteProvider
from fedsilo.crypto import (
    UpdateBinding,
    claims_sha256,
    sha256_hex,
    sign_claims,
    sign_policy_declaration,
    sign_update,
)
from fedsilo.model.adapters import AdapterState
from fedsilo.privacy.dp_sgd import train_local_dp
from fedsilo.privacy.events import PoissonGaussianEvent, event_to_json
from fedsilo.protocol.records import (
    DP_KEY,
    DpTask,
    PolicyDeclaration,
    RoundTask,
    SignedClaims,
    SignedPolicy,
    SiteMetrics,
    adapter_from_record,
    global_record_from_content,
    round_task_from_content,
)
from fedsilo.training.loop import train_plain
from fedsilo.training.progress import site_progress


@dataclass(frozen=True)
class LocalUpdate:
    """What a site's local training produced for one round task, before it is sent."""

    site: Site
    task: RoundTask
    delta: AdapterState
    metrics: SiteMetrics
    dp_event: dict[str, str | int | float] | None
    policy: PolicyDeclaration  # the policy it trained under, declared with the update


def local_update(
    message: Message,
    context: Context,
    sites: SiteProvider,
    *,
    channel: UpdateChannel,
    in_clear: Callable[[str], bool] = lambda _name: False,
) -> LocalUpdate:
    """Check the round task against the site's rules, then train from the global adapter.

    ``channel`` is how the update will leave the site; under HE ``in_clear`` says which of its
    tensors the round sends unencrypted. Both are checked against the site's policy: before
    training, and (for tensors in the clear) before a DP event is recorded as spent."""
    site = sites.site_for(context)
    content = message.content
    task = round_task_from_content(content)
    global_record = global_record_from_content(content)
    dp = (
        DpTask.from_record(content.config_records[DP_KEY])
        if DP_KEY in content.config_records
        else None
    )
    # The site's own rules come first: nothing is loaded or trained for a refused task.
    if site.policy is not None:
        check_channel(site.policy, channel, site=site.name)
        check_task(site.policy, task, site=site.name, num_examples=len(site.examples))
    if task.base_model_hash != site.base_model_hash:
        raise TaskRefusedError(
            f"site {site.name}: the round's base model {task.base_model_hash} is not the model "
            f"installed here ({site.base_model_hash})"
        )
    event = plan_round_event(dp, task, num_examples=len(site.examples)) if dp else None
    check_budget(site.policy, dp=dp, event=event, spent=read_spent(site.spent_path), site=site.name)
    global_state = adapter_from_record(
        global_record,
        like=site.adapter_template,
        what=f"global adapter sent to {site.name}",
    )
    if dp is not None and event is not None:
        delta, metrics = _train_private(site, task, dp, event, global_state)
    else:
        delta, metrics = _train(site, task, global_state)
    if site.policy is not None and channel == "he":
        check_nothing_in_clear(site.policy, delta, in_clear, site=site.name)
    if event is not None:
        # Released is spent: the event is on the site's record before the update leaves.
        record_spent(site.spent_path, run_id=task.run_id, round_number=task.round, event=event)
    dp_event = event_to_json(event) if event is not None else None
    return LocalUpdate(site, task, delta, metrics, dp_event, declare_policy(site.policy))


def sign_payload(
    site: Site, *, federation_id: str, run_id: str, round_number: int, stage: str, payload: bytes
) -> tuple[UpdateBinding, bytes]:
    """The site's binding of ``payload`` to this federation, run, round and stage, signed, and
    recorded as sent (a receipt is kept only for a payload recorded here)."""
    binding = UpdateBinding(
        federation_id=federation_id,
        run_id=run_id,
        round=round_number,
        stage=stage,
        site_id=site.name,
        payload_sha256=sha256_hex(payload),
    )
    signature = sign_update(site.signing_key, binding)
    remember_sent(site, binding)
    return binding, signature


def sign_policy(site: Site, binding: UpdateBinding, policy: PolicyDeclaration) -> SignedPolicy:
    """The site's declaration of the policy it trained under, signed with the update's binding."""
    signature = sign_policy_declaration(site.signing_key, binding, policy.fields())
    return SignedPolicy(policy, signature)


def sign_site_claims(
    site: Site,
    binding: UpdateBinding,
    *,
    metrics: SiteMetrics | None,
    dp_event: dict[str, str | int | float] | None,
) -> SignedClaims:
    """The site's signature on what it claims with the update ``binding`` names: the metrics
    that weight it (None where none are sent) and the DP event it is accounted by."""
    digest = claims_sha256(
        metrics=None if metrics is None else metrics.claim_fields(), dp_event=dp_event
    )
    return SignedClaims(digest, sign_claims(site.signing_key, binding, digest))


def _train(
    site: Site, task: RoundTask, global_state: AdapterState
) -> tuple[AdapterState, SiteMetrics]:
    result = train_plain(
        site.model,
        site.examples,
        global_state=global_state,
        steps=task.steps_for(len(site.examples)),
        batch_size=task.batch_size,
        learning_rate=task.learning_rate,
        proximal_mu=task.proximal_mu,
        max_grad_norm=task.max_grad_norm or None,
        pad_id=int(site.tokenizer.pad_token_id),
        seed=task.seed,
        on_step=site_progress(site.name),
    )
    metrics = SiteMetrics(
        num_examples=result.num_examples,
        train_loss=result.train_loss,
        tokens=result.tokens,
        seconds=result.seconds,
        precision=result.precision,
        padding_share=result.padding_share,
    )
    return result.delta, metrics


def _train_private(
    site: Site,
    task: RoundTask,
    dp: DpTask,
    event: PoissonGaussianEvent,
    global_state: AdapterState,
) -> tuple[AdapterState, SiteMetrics]:
    result = train_local_dp(
        site.model,
        site.examples,
        global_state=global_state,
        steps=event.steps,
        expected_batch_size=min(task.batch_size, len(site.examples)),
        learning_rate=task.learning_rate,
        max_grad_norm=dp.max_grad_norm,
        noise_multiplier=event.noise_multiplier,
        proximal_mu=task.proximal_mu,
        pad_id=int(site.tokenizer.pad_token_id),
        # The seed drives batch sampling and noise: it must be the site's secret, never the
        # round seed the coordinator chose, or the coordinator could subtract the noise.
        seed=secrets.randbits(63),
        on_step=site_progress(site.name),
    )
    # Only the DP-protected update is released: no count, loss, tokens or timing.
    return result.result.delta, SiteMetrics.withheld(precision=result.result.precision)


class SingleSite:
    """A SiteProvider that always answers with one site (already resolved by the caller)."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def site_for(self, context: Context) -> Site:
        del context
        return self.site
