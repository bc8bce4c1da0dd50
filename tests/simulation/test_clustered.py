"""Clustered federations on the tiny model: one expert per cluster, all of it ledgered."""

import shutil
import sqlite3
from collections.abc import Callable
from html import unescape
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedsilo.cli.main import main
from fedsilo.config import ConfigError, FedsiloConfig
from fedsilo.data.records import ChatRecord
from fedsilo.data.tasks import build_task
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.model.base import load_base_model
from fedsilo.server.audit import verify_run
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.engines import SimulationRequest, simulate

from .conftest import RecordingReporter

GROUPS = {
    "cardio-pulm": ["cardiology", "pulmonology"],
    "endo-ortho": ["endocrinology", "orthopedics"],
}


def _clustered(make_config: Callable[..., FedsiloConfig], **clusters: object) -> FedsiloConfig:
    return make_config(
        run={"rounds": 1},
        task={"num_sites": 4},
        train={"local_steps": 1},
        clusters=clusters,
    )


def test_groups_give_one_loadable_expert_per_cluster(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = _clustered(make_config, method="groups", groups=GROUPS)
    run_dir = tmp_path / "run"

    simulate(SimulationRequest(config, run_dir, resume=False, reporter=RecordingReporter()))

    base, _ = load_base_model(tiny_model_dir)
    for name, sites in GROUPS.items():
        sub = RunFolder(run_dir / "clusters" / name)
        assert sub.read_json(sub.status_path)["status"] == "completed"
        assert sorted(sub.read_metrics()[-1]["sites"]) == sorted(sites)
        model = PeftModel.from_pretrained(base, run_dir / "experts" / name, adapter_name=name)
        assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
        base = model.unload()
    assert RunFolder(run_dir).read_json(RunFolder(run_dir).status_path)["status"] == "completed"


def test_cluster_gold_set_is_its_own_domain(make_config: Callable[..., FedsiloConfig]) -> None:
    config = make_config(task={"num_sites": 4, "only_sites": ["cardiology", "pulmonology"]})

    task = build_task(config.task, seed=0)

    assert [site.name for site in task.sites] == ["pulmonology", "cardiology"]
    assert task.gold and {record.response[0] for record in task.gold} == {"I", "J"}


def test_groups_must_place_every_site(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = _clustered(make_config, method="groups", groups={"a": ["cardiology"]})

    with pytest.raises(ConfigError, match="not placed"):
        simulate(
            SimulationRequest(config, tmp_path / "run", resume=False, reporter=RecordingReporter())
        )


def test_update_cosine_clusters_are_deterministic(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    from fedsilo.server.clustering import agglomerate, cosine_similarities
    from fedsilo.simulation.clustered import ClusteredPaths, probe_updates

    config = _clustered(make_config, method="update-cosine", count=2)
    first = probe_updates(config, ClusteredPaths(tmp_path / "a"))
    second = probe_updates(config, ClusteredPaths(tmp_path / "b"))

    assert all(torch.equal(first[s][n], second[s][n]) for s in first for n in first[s])
    clusters = agglomerate(cosine_similarities(first), count=2)
    assert clusters == agglomerate(cosine_similarities(second), count=2)
    assert sorted(site for c in clusters for site in c) == sorted(first)


@pytest.fixture
def clustered_run(make_config: Callable[..., FedsiloConfig], tmp_path: Path) -> Path:
    config = _clustered(make_config, method="groups", groups=GROUPS)
    run_dir = tmp_path / "run"
    simulate(SimulationRequest(config, run_dir, resume=False, reporter=RecordingReporter()))
    return run_dir


def test_clustered_run_and_its_distillation_verify_end_to_end(
    clustered_run: Path, tmp_path: Path
) -> None:
    transfer = tmp_path / "transfer.jsonl"
    assert (
        main(["transfer-set", str(clustered_run), "--per-expert", "4", "--out", str(transfer)]) == 0
    )
    master = tmp_path / "master"
    argv = ["distill", "--experts", str(clustered_run / "experts"), "--transfer", str(transfer)]
    assert main([*argv, "--out", str(master), "--steps", "2"]) == 0

    assert verify_run(clustered_run).ok
    assert verify_run(master).ok
    sources = read_entries(master / "ledger.db")[1].payload["source_run"]
    assert isinstance(sources, dict) and sources["folder"] == str(clustered_run.resolve())
    kinds = [e.kind for e in read_entries(clustered_run / "ledger.db")]
    assert kinds == [
        EntryKind.RUN_STARTED,
        EntryKind.CLUSTERS_ASSIGNED,
        EntryKind.EXPERT_FINISHED,
        EntryKind.EXPERT_FINISHED,
        EntryKind.RUN_FINISHED,
    ]


def test_edited_cluster_ledger_fails_the_clustered_run(clustered_run: Path) -> None:
    with sqlite3.connect(clustered_run / "clusters" / "cardio-pulm" / "ledger.db") as db:
        db.execute(
            "UPDATE entries SET payload = replace(payload, '\"num_examples\":8', "
            "'\"num_examples\":800') WHERE kind = 'update_received'"
        )

    report = verify_run(clustered_run)

    assert not report.ok
    assert any("cluster cardio-pulm" in p.reason for p in report.problems)


def test_swapped_expert_fails_the_clustered_run(clustered_run: Path) -> None:
    experts = clustered_run / "experts"
    weights = "adapter_model.safetensors"
    (experts / "cardio-pulm" / weights).write_bytes((experts / "endo-ortho" / weights).read_bytes())

    report = verify_run(clustered_run)

    assert any("expert cardio-pulm" in p.reason for p in report.problems)


def test_extra_expert_folder_fails_the_clustered_run(clustered_run: Path) -> None:
    shutil.copytree(clustered_run / "experts" / "cardio-pulm", clustered_run / "experts" / "rogue")

    report = verify_run(clustered_run)

    assert any("rogue is not recorded" in p.reason for p in report.problems)


def test_update_cosine_run_verifies_and_a_swapped_probe_fails(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = _clustered(make_config, method="update-cosine", count=2)
    run_dir = tmp_path / "run"
    simulate(SimulationRequest(config, run_dir, resume=False, reporter=RecordingReporter()))
    assigned = read_entries(run_dir / "ledger.db")[1].payload
    assert assigned["method"] == "update-cosine" and assigned["count"] == 2
    assert verify_run(run_dir).ok

    probes = sorted((run_dir / "probe").iterdir())
    probes[0].write_bytes(probes[1].read_bytes())

    report = verify_run(run_dir)
    assert any("probe update of" in p.reason for p in report.problems)


def test_update_cosine_is_refused_with_differential_privacy(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(
        task={"num_sites": 4},
        privacy={"site_level": True},
        clusters={"method": "update-cosine", "count": 2},
    )

    with pytest.raises(ConfigError, match="differential privacy"):
        simulate(
            SimulationRequest(config, tmp_path / "run", resume=False, reporter=RecordingReporter())
        )
    assert not (tmp_path / "run" / "probe").exists()


def test_distill_refuses_a_transfer_set_holding_a_site_record(
    clustered_run: Path, tmp_path: Path
) -> None:
    from fedsilo.config import load_config
    from fedsilo.distill.run import DistillError, DistillSettings, distill
    from fedsilo.distill.transfer import TransferRecord, write_transfer

    config = load_config(clustered_run / "config.toml")
    site_record = build_task(config.task, seed=0).sites[0].records[0]
    assert isinstance(site_record, ChatRecord)
    transfer = tmp_path / "leaky.jsonl"
    write_transfer([TransferRecord(site_record.prompt, "X00", "cardio-pulm")], transfer)

    with pytest.raises(DistillError, match="shares 1 record"):
        distill(
            clustered_run / "experts", transfer, tmp_path / "m", settings=DistillSettings(steps=1)
        )
    assert not (tmp_path / "m" / "ledger.db").exists()


def test_clustered_run_gets_a_compliance_report(clustered_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"

    assert main(["audit", "report", str(clustered_run), "--out", str(out)]) == 0

    page = out.read_text(encoding="utf-8")
    assert "clustered run (one expert per cluster)" in page
    assert 'class="banner pass"' in page
    for cluster in GROUPS:
        assert f"expert {cluster}: cluster run" in page
    # The experts trained in their own runs: this ledger's lack of DP events and updates is
    # not reported as a run without privacy or without training.
    text = unescape(page)
    assert "This folder's ledger records no training on site records" in text
    assert "No differential privacy event is recorded" not in text
    assert "none in this folder's ledger: the training on site records ran in the expert" in text
    for cluster in GROUPS:
        assert f"in clusters/{cluster} (its report: fedsilo audit report" in text
