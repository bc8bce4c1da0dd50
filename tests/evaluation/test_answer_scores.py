"""Teacher-forced answer scores, computed at answer positions only, equal the full logits'."""

from collections.abc import Callable

import torch

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.data.batching import collate
from fedsilo.data.encode import IGNORE_INDEX, encode_record
from fedsilo.data.records import ChatRecord
from fedsilo.evaluation.gold import answer_scores


def test_answer_scores_match_the_full_logits(make_config: Callable[..., FedsiloConfig]) -> None:
    loaded = load_model_with_adapter(make_config())
    records = [ChatRecord(prompt="p" * (3 + i), response="A1" * (1 + i % 3)) for i in range(5)]

    scores = answer_scores(
        loaded.model, loaded.tokenizer, records, system_prompt=None, max_length=64, batch_size=2
    )

    for index, record in enumerate(records):
        example = encode_record(loaded.tokenizer, record, system_prompt=None, max_length=64)
        batch = collate([example], pad_id=int(loaded.tokenizer.pad_token_id))
        with torch.no_grad():
            logits = loaded.model(**batch).logits[0, :-1]
        targets = batch["labels"][0, 1:]
        kept = targets != IGNORE_INDEX
        losses = torch.nn.functional.cross_entropy(logits[kept], targets[kept], reduction="none")
        best = logits[kept].topk(5, dim=-1).indices
        assert abs(scores.losses[index] - float(losses.mean())) < 1e-5
        assert abs(scores.log_likelihoods[index] + float(losses.sum())) < 1e-4
        assert scores.top1[index] == int((best[:, 0] == targets[kept]).sum())
        assert scores.top5[index] == int((best == targets[kept][:, None]).any(dim=-1).sum())
        assert scores.tokens[index] == int(kept.sum())
