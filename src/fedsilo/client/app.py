"""The fedsilo ClientApp: what a site does when the server asks it to train."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsilo.client.site import SiteProvider
from fedsilo.client.train import train_local
from fedsilo.protocol.records import (
    GLOBAL_KEY,
    TASK_KEY,
    RoundTask,
    SiteMetrics,
    adapter_from_record,
    train_reply,
)


class TaskRefusedError(RuntimeError):
    """The site will not run this round task; the reason reaches the server as an error."""


def handle_train(message: Message, context: Context, sites: SiteProvider) -> Message:
    """Check the round task, train locally from the global adapter, reply with the delta."""
    site = sites.site_for(context)
    task = RoundTask.from_record(message.content.config_records[TASK_KEY])
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
    return Message(train_reply(result.delta, metrics, site=site.name), reply_to=message)


def build_client_app(sites: SiteProvider) -> ClientApp:
    """A ClientApp whose train handler serves the sites ``sites`` provides."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, sites)

    return app
