"""The transfer set holds no site data: codes outside every site and the gold set."""

from collections.abc import Callable
from pathlib import Path

import pytest

from fedsilo.config import FedsiloConfig
from fedsilo.data.icd10 import chapter_of_code
from fedsilo.data.records import ChatRecord, DataError
from fedsilo.data.tasks import build_task
from fedsilo.distill.transfer import (
    TransferRecord,
    build_icd10_transfer,
    load_transfer,
    site_overlap,
    write_transfer,
)

CLUSTERS = {
    "heart-lung": ["cardiology", "pulmonology"],
    "gland-bone": ["endocrinology", "orthopedics"],
}


def test_icd10_transfer_set_shares_nothing_with_sites_or_gold(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    task = build_task(make_config(task={"num_sites": 4, "examples_per_site": 64}).task, seed=0)

    records = build_icd10_transfer(task, CLUSTERS, per_expert=40, seed=3)

    held = [r for site in task.sites for r in site.records if isinstance(r, ChatRecord)]
    held += list(task.gold)
    assert len(records) == 80
    assert not {r.response for r in records} & {r.response for r in held}
    assert not {r.prompt for r in records} & {r.prompt for r in held}
    assert site_overlap(records, task) == []
    chapters = {
        r.expert: {chapter_of_code(x.response) for x in records if x.expert == r.expert}
        for r in records
    }
    assert chapters == {"heart-lung": {"9", "10"}, "gland-bone": {"4", "13"}}
    assert records == build_icd10_transfer(task, CLUSTERS, per_expert=40, seed=3)


def test_site_overlap_finds_a_planted_site_record(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    task = build_task(make_config(task={"num_sites": 4}).task, seed=0)
    leaked = task.sites[0].records[0]
    assert isinstance(leaked, ChatRecord)
    records = [TransferRecord("public prompt", "Z99.89"), TransferRecord(leaked.prompt, "X", "e")]

    assert site_overlap(records, task) == [records[1]]


def test_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    records = [TransferRecord("a", "b", "x"), TransferRecord("c", "d")]
    write_transfer(records, path)
    assert load_transfer(path) == records

    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: field 'response'"):
        load_transfer(path)
    path.write_text('{"prompt": "a", "response": "b", "site": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="unknown fields"):
        load_transfer(path)
