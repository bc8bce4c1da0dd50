"""The loss at labelled positions only equals the loss from the full logits."""

from collections.abc import Callable

import torch

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.data.batching import collate
from fedsilo.data.encode import IGNORE_INDEX, encode_records
from fedsilo.data.records import ChatRecord
from fedsilo.training.loss import labelled_token_losses


def test_labelled_losses_match_the_full_logits(make_config: Callable[..., FedsiloConfig]) -> None:
    loaded = load_model_with_adapter(make_config())
    records = [ChatRecord(prompt=f"code {i}" * (i + 1), response="A" * (i + 1)) for i in range(4)]
    examples = encode_records(
        loaded.tokenizer, records, system_prompt=None, max_length=64, source="test"
    )
    batch = collate(examples, pad_id=int(loaded.tokenizer.pad_token_id))

    with torch.no_grad():
        full = loaded.model(**batch)
        ours = labelled_token_losses(loaded.model, batch)

    targets = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        full.logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    per_example = per_token.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1)
    torch.testing.assert_close(ours.token_mean(), full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.per_example_mean(), per_example, rtol=1e-5, atol=1e-6)
    assert ours.losses.numel() == sum(example.num_targets for example in examples)
