"""The fedsilo ClientApp: what a site does when the server asks it to train, or sends a receipt."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsilo.client.policy import TaskRefusedError, check_task
from fedsilo.client.privacy_budget import (
    check_budget,
    plan_round_event,
    read_spent,
    record_spent,
)
from fedsilo.client.site import Site, SiteProvider
from fedsilo.client.train import train_local
from fedsilo.crypto import UpdateBinding, encode_signature, sha256_hex, sign_update, verify_receipt
from fedsilo.model.adapters import AdapterState, adapter_to_bytes
from fedsilo.privacy.dp_sgd import train_local_dp
from fedsilo.privacy.events import PoissonGaussianEvent, event_to_json
from fedsilo.protocol.records import (
    DP_KEY,
    GLOBAL_KEY,
    TASK_KEY,
    DpTask,
    RoundTask,
    SiteMetrics,
    adapter_from_record,
    receipt_from_record,
    train_reply,
)
from fedsilo.storage import write_text_atomic


def handle_train(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Check the round task, train locally from the global adapter, reply with the signed delta."""
    site = sites.site_for(context)
    content = message.content
    task = RoundTask.from_record(content.config_records[TASK_KEY])
    dp = (
        DpTask.from_record(content.config_records[DP_KEY])
        if DP_KEY in content.config_records
        else None
    )
    # The site's own rules come first: nothing is loaded or trained for a refused task.
    if site.policy is not None:
        check_task(site.policy, task, site=site.name)
    if task.base_model_hash != site.base_model_hash:
        raise TaskRefusedError(
            f"site {site.name}: the round's base model {task.base_model_hash} is not the model "
            f"installed here ({site.base_model_hash})"
        )
    event = plan_round_event(dp, task, num_examples=len(site.examples)) if dp else None
    check_budget(site.policy, dp=dp, event=event, spent=read_spent(site.spent_path), site=site.name)
    global_state = adapter_from_record(
        content.array_records[GLOBAL_KEY],
        like=site.adapter_template,
        what=f"global adapter sent to {site.name}",
    )
    if dp is not None and event is not None:
        delta, metrics = _train_private(site, task, dp, event, global_state)
        # Released is spent: the event is on the site's record before the update leaves.
        record_spent(site.spent_path, run_id=task.run_id, round_number=task.round, event=event)
    else:
        delta, metrics = _train(site, task, global_state)
    # The site signs the exact bytes it sends, bound to this federation, run, round and stage.
    payload = adapter_to_bytes(delta)
    binding = UpdateBinding(
        federation_id=task.federation_id,
        run_id=task.run_id,
        round=task.round,
        stage=task.stage,
        site_id=site.name,
        payload_sha256=sha256_hex(payload),
    )
    signature = sign_update(site.signing_key, binding)
    dp_event = event_to_json(event) if event is not None else None
    reply = train_reply(payload, metrics, binding, signature, dp_event=dp_event)
    return Message(reply, reply_to=message)


def _train(
    site: Site, task: RoundTask, global_state: AdapterState
) -> tuple[AdapterState, SiteMetrics]:
    result = train_local(
        site.model,
        site.examples,
        global_state=global_state,
        steps=task.local_steps,
        batch_size=task.batch_size,
        learning_rate=task.learning_rate,
        proximal_mu=task.proximal_mu,
        max_grad_norm=task.max_grad_norm or None,
        pad_id=int(site.tokenizer.pad_token_id),
        seed=task.seed,
    )
    metrics = SiteMetrics(
        num_examples=result.num_examples,
        train_loss=result.train_loss,
        tokens=result.tokens,
        seconds=result.seconds,
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
    )
    # Only the DP-protected update is released: no count, loss, tokens or timing.
    return result.result.delta, SiteMetrics.withheld()


def handle_receipt(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Verify the coordinator's receipt for one of this site's updates and keep it."""
    site = sites.site_for(context)
    receipt, signature = receipt_from_record(message.content)
    if receipt.binding.site_id != site.name:
        raise ValueError(
            f"site {site.name}: refusing a receipt issued to {receipt.binding.site_id!r}"
        )
    verify_receipt(site.coordinator_key, receipt, signature)
    record = {**asdict(receipt), "signature": encode_signature(signature)}
    path = site.receipts_dir / f"round-{receipt.binding.round}-{receipt.binding.stage}.json"
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return Message(RecordDict(), reply_to=message)


def build_client_app(sites: SiteProvider) -> ClientApp:
    """A ClientApp whose handlers serve the sites ``sites`` provides."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, sites)

    @app.query("receipt")
    def receipt(message: Message, context: Context) -> Message:
        return handle_receipt(message, context, sites)

    return app
