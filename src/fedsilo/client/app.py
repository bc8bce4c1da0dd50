"""The fedsilo ClientApp: what a site does when the server asks it to train, or sends a receipt."""

from __future__ import annotations

import json
from dataclasses import asdict

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsilo.client.policy import TaskRefusedError, check_task
from fedsilo.client.site import SiteProvider
from fedsilo.client.train import train_local
from fedsilo.crypto import UpdateBinding, encode_signature, sha256_hex, sign_update, verify_receipt
from fedsilo.model.adapters import adapter_to_bytes
from fedsilo.protocol.records import (
    GLOBAL_KEY,
    TASK_KEY,
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
    task = RoundTask.from_record(message.content.config_records[TASK_KEY])
    # The site's own rules come first: nothing is loaded or trained for a refused task.
    if site.policy is not None:
        check_task(site.policy, task, site=site.name)
    if task.base_model_hash != site.base_model_hash:
        raise TaskRefusedError(
            f"site {site.name}: the round's base model {task.base_model_hash} is not the model "
            f"installed here ({site.base_model_hash})"
        )
    global_state = adapter_from_record(
        message.content.array_records[GLOBAL_KEY],
        like=site.adapter_template,
        what=f"global adapter sent to {site.name}",
    )
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
    # The site signs the exact bytes it sends, bound to this federation, run, round and stage.
    payload = adapter_to_bytes(result.delta)
    binding = UpdateBinding(
        federation_id=task.federation_id,
        run_id=task.run_id,
        round=task.round,
        stage=task.stage,
        site_id=site.name,
        payload_sha256=sha256_hex(payload),
    )
    signature = sign_update(site.signing_key, binding)
    return Message(train_reply(payload, metrics, binding, signature), reply_to=message)


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
