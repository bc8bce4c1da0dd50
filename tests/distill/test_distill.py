"""`fedsilo distill` on the tiny model: the student learns the experts, and says where from."""

import sqlite3
from html import unescape
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedsilo.cli.main import main
from fedsilo.distill.experts import load_experts
from fedsilo.distill.run import DistillSettings, distill
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.model.base import load_base_model
from fedsilo.server.audit import verify_run

SETTINGS = DistillSettings(temperature=2.0, steps=40, batch_size=4, learning_rate=0.02, seed=0)


@pytest.fixture
def distilled(experts_dir: Path, transfer_file: Path, tmp_path: Path) -> Path:
    out = tmp_path / "master"
    distill(experts_dir, transfer_file, out, settings=SETTINGS, system_prompt="Code it.")
    return out


def test_distillation_reduces_the_students_kl_to_the_teachers(
    experts_dir: Path, transfer_file: Path, tmp_path: Path
) -> None:
    result = distill(experts_dir, transfer_file, tmp_path / "m", settings=SETTINGS)

    assert result.kl_before > 0.01
    assert result.kl_after < 0.5 * result.kl_before
    assert result.routed == {"cardio": 4, "endo": 4}


def test_best_expert_router_picks_an_expert_per_example(
    experts_dir: Path, transfer_file: Path, tmp_path: Path
) -> None:
    settings = DistillSettings(steps=2, router="best-expert")

    result = distill(experts_dir, transfer_file, tmp_path / "m", settings=settings)

    assert sum(result.routed.values()) == 8


def test_master_loads_as_peft_adapter_and_exports(
    distilled: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base, _ = load_base_model(tiny_model_dir)
    model = PeftModel.from_pretrained(base, distilled / "final")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    assert main(["export", str(distilled), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "adapter_model.safetensors").read_bytes() == (
        distilled / "final" / "adapter_model.safetensors"
    ).read_bytes()


def test_provenance_is_ledgered_and_verifies(distilled: Path, experts_dir: Path) -> None:
    entries = read_entries(distilled / "ledger.db")
    kinds = [entry.kind for entry in entries]
    sources = entries[1].payload

    assert kinds == [EntryKind.RUN_STARTED, EntryKind.DISTILL_SOURCES, EntryKind.RUN_FINISHED]
    assert entries[0].payload["hyperparameters"]["temperature"] == 2.0
    assert {
        name: value["peft_sha256"]
        for name, value in sources["experts"].items()  # type: ignore[union-attr]
    } == {e.name: e.peft_sha256 for e in load_experts(experts_dir)}
    assert main(["audit", "verify", str(distilled)]) == 0


def test_edited_provenance_entry_fails(distilled: Path) -> None:
    with sqlite3.connect(distilled / "ledger.db") as db:
        db.execute(
            'UPDATE entries SET payload = replace(payload, \'"router":"label"\', '
            "'\"router\":\"best-expert\"') WHERE kind = 'distill_sources'"
        )

    report = verify_run(distilled)

    assert not report.ok
    assert any("entry_hash does not match" in p.reason for p in report.problems)


@pytest.mark.parametrize("victim", ["expert", "transfer", "master"])
def test_swapped_file_fails(distilled: Path, experts_dir: Path, victim: str) -> None:
    path = {
        "expert": experts_dir / "endo" / "adapter_model.safetensors",
        "transfer": distilled / "transfer.jsonl",
        "master": distilled / "final" / "adapter_model.safetensors",
    }[victim]
    path.write_bytes(path.read_bytes() + b" ")

    report = verify_run(distilled)

    assert not report.ok
    assert any("hashes to" in p.reason for p in report.problems)


def test_unlabelled_record_is_refused_by_the_label_router(
    experts_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n', encoding="utf-8")

    with pytest.raises(ValueError, match="transfer record 1: expert None"):
        distill(experts_dir, path, tmp_path / "m", settings=DistillSettings(steps=1))


def test_student_starts_as_base_model(
    experts_dir: Path, transfer_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m"
    distill(experts_dir, transfer_file, out, settings=DistillSettings(steps=1))
    started = read_entries(out / "ledger.db")[0].payload

    assert started["student_lora"] == {
        "rank": 4,
        "alpha": 8.0,
        "target_modules": ["down_proj", "o_proj", "q_proj", "v_proj"],
    }
    assert torch.get_num_threads() == 1


def test_distillation_gets_a_compliance_report(distilled: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"

    assert main(["audit", "report", str(distilled), "--out", str(out)]) == 0

    page = out.read_text(encoding="utf-8")
    assert "<dd>distillation</dd>" in page
    assert 'class="banner pass"' in page
    for expert in read_entries(distilled / "ledger.db")[1].payload["experts"]:  # type: ignore[union-attr]
        assert f"distilled from expert {expert}: adapter" in page
    text = unescape(page)
    assert "This folder's ledger records no training on site records: the adapter was " in text
    assert "No differential privacy event is recorded" not in text
