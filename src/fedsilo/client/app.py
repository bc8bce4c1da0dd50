"""The fedsilo ClientApp: what a site does when the server asks it to train, or sends a receipt."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsilo.client import he, secagg
from fedsilo.client.local import local_update, sign_payload, sign_policy, sign_site_claims
from fedsilo.client.receipts import keep_receipt
from fedsilo.client.site import SiteProvider
from fedsilo.model.adapters import adapter_to_bytes
from fedsilo.protocol.records import receipt_from_record, train_reply


def handle_train(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Check the round task, train locally from the global adapter, reply with the signed delta."""
    update = local_update(message, context, sites, channel="clear")
    # The site signs the exact bytes it sends, bound to this federation, run, round and stage.
    payload = adapter_to_bytes(update.delta)
    task = update.task
    binding, signature = sign_payload(
        update.site,
        federation_id=task.federation_id,
        run_id=task.run_id,
        round_number=task.round,
        stage=task.stage,
        payload=payload,
    )
    policy = sign_policy(update.site, binding, update.policy)
    claims = sign_site_claims(
        update.site, binding, metrics=update.metrics, dp_event=update.dp_event
    )
    reply = train_reply(
        payload, update.metrics, binding, signature, policy, claims, update.dp_event
    )
    return Message(reply, reply_to=message)


def handle_receipt(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Verify the coordinator's receipt for one of this site's updates and keep it."""
    site = sites.site_for(context)
    receipt, signature = receipt_from_record(message.content)
    keep_receipt(site, receipt, signature)
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

    secagg.register(app, sites)
    he.register(app, sites)

    return app
