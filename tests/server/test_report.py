"""The compliance report of real (tiny) runs: verdicts, outcome, privacy, refusals, evidence."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import sqlite3
from collections.abc import Callable
from html import unescape
from pathlib import Path

import pytest

from fedsilo.cli.main import main
from fedsilo.client.policy import load_policy, policy_digest
from fedsilo.config import FedsiloConfig, load_config
from fedsilo.crypto import generate_private_key, write_public_key
from fedsilo.data.tasks import build_task
from fedsilo.evaluation.bootstrap import exact_bounds_at_zero
from fedsilo.ledger import Entry, EntryKind, payload_json, read_entries
from fedsilo.ledger.entries import JsonValue
from fedsilo.report import render_report
from fedsilo.server.audit import verify_run
from fedsilo.server.federation import FederationError
from fedsilo.server.report_data import build_report_data
from fedsilo.server.report_privacy import privacy_of
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.inprocess_grid import FIRST_NODE_ID

from ..simulation.conftest import run_with_grid


def _report(run: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["audit", "report", str(run), "--out", str(out), *extra])
    return code, out.read_text(encoding="utf-8")


def _pinned_key(run: Path) -> str:
    # The coordinator key as an auditor would hold it: a copy of the public key file.
    return str(run / "coordinator" / "coordinator.pub")


def _site_public_keys(run: Path, into: Path) -> Path:
    """The sites' public keys as an auditor would hold them: one NAME.pub per site."""
    into.mkdir()
    for public in run.glob("sites/*/*.pub"):
        shutil.copy(public, into / public.name)
    return into


def _visible_text(page: str) -> str:
    body = page.split("<body>", 1)[-1]
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", body)))


@pytest.fixture
def dp_run_with_refusal(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> tuple[Path, str]:
    """Record-level DP over 2 rounds; one site's budget lets it join round 1 and refuse round 2."""
    policies = tmp_path / "policies"
    policies.mkdir()
    config = make_config(
        run={"rounds": 2, "site_policies": str(policies)},
        privacy={"record_level": True, "noise_multiplier": 1.0, "delta": 1e-5},
    )
    thrifty = build_task(config.task, seed=config.run.seed).sites[0].name
    (policies / f"{thrifty}.toml").write_text(
        '[accept]\nfederation_id = "fedsilo-simulation"\n[limits]\nmin_cohort = 2\n'
        "[privacy]\nmax_epsilon = 4.5\ndelta = 1e-5\n"
    )
    run_with_grid(config, tmp_path / "run")
    return tmp_path / "run", thrifty


def test_dp_run_reports_epsilon_per_site_equal_to_the_privacy_command(
    dp_run_with_refusal: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, thrifty = dp_run_with_refusal
    main(["privacy", str(run)])
    output = capsys.readouterr().out
    printed = {
        line.split()[0]: line.split()[2]
        for line in output.splitlines()
        if line.endswith(("yes", "NO"))
    }

    code, html = _report(run, tmp_path / "report.html", "--coordinator-key", _pinned_key(run))

    assert code == 0
    text = _visible_text(html)
    assert "No differential privacy" not in text
    assert "record-level (DP-SGD at every site)" in text
    assert "Privacy loss \u03b5 per site after each round" in html  # the epsilon chart
    assert len(printed) == 3
    for site, epsilon in printed.items():
        # One row per site: its DP mode, accountant, delta, epsilon after each round, final.
        rounds = "round 1: [0-9.]+" if site == thrifty else "round 1: [0-9.]+; round 2: [0-9.]+"
        row = rf"{re.escape(site)} record-level DP-SGD rdp 1e-05 {rounds} {epsilon}\b"
        assert re.search(row, text), (site, epsilon)
    assert "Metric: code" in text and "Accuracy (code)" in text and "Gold n" in text
    # Both say what the ledger's epsilon leaves out: a rejected update a site released.
    caveat = "epsilon here composes its accepted updates only"
    assert caveat in output
    assert caveat.replace("epsilon", "\u03b5") in text and "privacy-spent.json" in text


def test_policies_shown_are_the_ones_sites_declared_in_the_ledger(
    dp_run_with_refusal: tuple[Path, str], tmp_path: Path
) -> None:
    run, thrifty = dp_run_with_refusal
    policies = run.parent / "policies"
    digest = policy_digest(load_policy(policies / f"{thrifty}.toml"))
    updates = [e for e in read_entries(run / "ledger.db") if e.kind is EntryKind.UPDATE_RECEIVED]
    others = sorted({str(e.payload["site_id"]) for e in updates} - {thrifty})
    assert len(others) == 2
    # The report reads the sites' declarations from the ledger, not files at report time.
    shutil.rmtree(policies)

    _, html = _report(run, tmp_path / "report.html", "--coordinator-key", _pinned_key(run))

    text = _visible_text(html)
    assert f"{thrifty} {digest} 2 1 " in text  # declared with its one accepted update
    for site in others:
        assert f"{site} none: the site trains without a policy 1 1, 2 " in text
    assert "not available" not in text


def test_refusal_is_attributed_to_the_signed_site_in_one_line(
    dp_run_with_refusal: tuple[Path, str], tmp_path: Path
) -> None:
    run, thrifty = dp_run_with_refusal

    _, html = _report(run, tmp_path / "report.html", "--coordinator-key", _pinned_key(run))

    text = _visible_text(html)
    # The site's row counts its refusal; the refusal row names it (recorded under its node).
    assert re.search(rf"{re.escape(thrifty)} \S+ 1 1\b", text)
    assert re.search(rf"2 {re.escape(thrifty)} \(recorded as node-\d+\) rejected", text)
    assert "over the policy's budget of 4.5" in text
    assert "Traceback" not in html
    # The ledger itself holds the one-line reason; the traceback stays in the coordinator's log.
    rejected = [e for e in read_entries(run / "ledger.db") if e.kind is EntryKind.UPDATE_REJECTED]
    assert rejected and all("\n" not in str(e.payload["reason"]) for e in rejected)
    assert str(Path.home()) not in html and "/site-packages/" not in html
    assert str(tmp_path) not in html


def test_pinned_key_report_passes_and_folder_key_report_warns(
    dp_run_with_refusal: tuple[Path, str], tmp_path: Path
) -> None:
    run, _ = dp_run_with_refusal
    site_keys = _site_public_keys(run, tmp_path / "site-keys")

    pinned_code, pinned = _report(
        run,
        tmp_path / "a.html",
        "--coordinator-key",
        _pinned_key(run),
        "--site-keys",
        str(site_keys),
    )
    folder_code, folder = _report(run, tmp_path / "b.html")

    assert (pinned_code, folder_code) == (0, 0)
    assert 'class="banner pass"' in pinned and 'class="banner pass"' in folder
    assert "pinned by the auditor (<code>--coordinator-key</code>)" in pinned
    assert "pinned by the auditor (<code>--site-keys</code>)" in pinned
    assert "taken from the run folder" not in pinned and 'class="warning"' not in pinned
    assert "The coordinator key was taken from the run folder." in folder
    assert "The site keys were taken from the run folder." in folder
    assert 'class="warning"' in folder


def test_every_hash_is_shown_whole(dp_run_with_refusal: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = dp_run_with_refusal
    entries = read_entries(run / "ledger.db")

    _, html = _report(run, tmp_path / "report.html")

    aggregates = [
        e.payload["adapter_sha256"] for e in entries if e.kind is EntryKind.ROUND_AGGREGATED
    ]
    final = next(e for e in entries if e.kind is EntryKind.RUN_FINISHED)
    for digest in [*aggregates, final.payload["final_adapter_sha256"], entries[-1].entry_hash]:
        assert f">{digest}<" in html
    for label in ("Run id", "Started", "Ended", "torch version", "flwr version", "Base model"):
        assert f"<dt>{label}</dt>" in html


def test_failed_run_is_reported_failed_without_a_pass_banner(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(run={"rounds": 2}, strategy={"min_sites": 3, "max_round_attempts": 1})
    with pytest.raises(FederationError):
        run_with_grid(config, tmp_path / "run", unreachable=[FIRST_NODE_ID + 2])

    code, html = _report(tmp_path / "run", tmp_path / "report.html")

    assert code == 0  # the ledger verifies: the run failed, the evidence did not
    assert 'class="banner pass"' not in html
    assert 'class="banner fail"' in html
    text = _visible_text(html)
    assert "The run failed" in text and "min_sites=3" in text
    assert "Traceback" not in html


def test_tampered_ledger_gets_a_fail_report_naming_the_first_broken_entry(
    dp_run_with_refusal: tuple[Path, str], tmp_path: Path
) -> None:
    run, _ = dp_run_with_refusal
    with sqlite3.connect(run / "ledger.db") as db:
        # Equivalent JSON, but not canonical: still tampering.
        seq = db.execute("SELECT min(seq) FROM entries WHERE kind = 'update_received'").fetchone()[
            0
        ]
        db.execute("UPDATE entries SET payload = ' ' || payload WHERE seq = ?", (seq,))

    code, html = _report(run, tmp_path / "report.html", "--coordinator-key", _pinned_key(run))

    assert code == 1
    assert 'class="banner fail"' in html and 'class="banner pass"' not in html
    assert f"first broken at entry {seq}:" in _visible_text(html)


def test_wrong_pinned_key_gets_a_fail_report(
    dp_run_with_refusal: tuple[Path, str], tmp_path: Path
) -> None:
    run, _ = dp_run_with_refusal
    other = tmp_path / "other.pub"
    write_public_key(generate_private_key().public_key(), other)

    code, html = _report(run, tmp_path / "report.html", "--coordinator-key", str(other))

    assert code == 1
    assert 'class="banner fail"' in html
    assert "Ledger verification failed" in _visible_text(html)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_verify_and_report_leave_the_evidence_folder_byte_identical(
    dp_run_with_refusal: tuple[Path, str], tmp_path: Path
) -> None:
    run, _ = dp_run_with_refusal
    before = _tree_digest(run)

    assert main(["audit", "verify", str(run)]) == 0
    _report(run, tmp_path / "report.html")

    assert _tree_digest(run) == before
    assert not (run / "ledger.db-wal").exists() and not (run / "ledger.db-shm").exists()


@pytest.fixture
def plain_run(make_config: Callable[..., FedsiloConfig], tmp_path: Path) -> Path:
    """No DP, no secure aggregation, FedAvg with server momentum, two rounds, in-process."""
    config = make_config(run={"rounds": 2}, strategy={"server_momentum": 0.5})
    run_with_grid(config, tmp_path / "run")
    return tmp_path / "run"


def _aggregated(run: Path) -> list[dict[str, object]]:
    return [
        e.payload for e in read_entries(run / "ledger.db") if e.kind is EntryKind.ROUND_AGGREGATED
    ]


def _summed(payload: dict[str, object]) -> str:
    sites = payload["sites"]
    assert isinstance(sites, list)
    return ", ".join(str(site) for site in sites)


def test_dp_run_says_example_counts_are_withheld_never_the_placeholder_sum(
    dp_run_with_refusal: tuple[Path, str], tmp_path: Path
) -> None:
    run, _ = dp_run_with_refusal

    _, html = _report(run, tmp_path / "report.html")

    text = _visible_text(html)
    for payload in _aggregated(run):
        # The ledger's total is one placeholder per site, not a count of examples.
        assert payload["examples"] == len(payload["sites"])  # type: ignore[arg-type]
        row = rf"{payload['round']} {re.escape(_summed(payload))}(?: \(\d+ failed\))? "
        assert re.search(row + r"withheld \(record-level DP\) ", text)
        assert not re.search(row + rf"{payload['examples']} ", text)
    assert "sends a placeholder count of 1 with each update" in text


def test_plain_run_shows_the_training_set_sizes_the_sites_signed(
    plain_run: Path, tmp_path: Path
) -> None:
    updates = [
        e.payload
        for e in read_entries(plain_run / "ledger.db")
        if e.kind is EntryKind.UPDATE_RECEIVED
    ]

    _, html = _report(plain_run, tmp_path / "report.html")

    text = _visible_text(html)
    for payload in _aggregated(plain_run):
        signed = sum(
            int(u["num_examples"])  # type: ignore[call-overload]
            for u in updates
            if u["round"] == payload["round"]
        )
        assert f"{payload['round']} {_summed(payload)} {signed} " in text
    assert "withheld" not in text
    assert "The coordinator weighed each update by its site's count" in text


def test_secure_aggregation_run_shows_no_example_count(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run_with_grid(make_config(run={"rounds": 1}, secure_aggregation={"mode": "secagg"}), run)
    (payload,) = _aggregated(run)
    sent = [
        e.payload
        for e in read_entries(run / "ledger.db")
        if e.kind is EntryKind.UPDATE_RECEIVED and e.payload.get("round") == 1
    ]
    # No site sends a count; the ledger's total is the number of sites summed.
    assert sent and all("num_examples" not in u for u in sent)
    assert payload["examples"] == len(payload["sites"])  # type: ignore[arg-type]

    _, html = _report(run, tmp_path / "report.html")

    text = _visible_text(html)
    assert f"1 {_summed(payload)} withheld (secure aggregation) " in text
    assert "Under secure aggregation the sites send no example count" in text
    # Who could see one site's update, as the run's signed ledger states it.
    assert "Who could see one site's update secure aggregation, no key holder" in text
    assert "subtract two sums whose cohorts differ in one site" in text


@pytest.mark.parametrize(
    ("recorded", "said"),
    [
        ({"he_tensors": ["lora_B"]}, "the tensors whose names contain lora_B; the others"),
        ({"he_tensors": []}, "all of the adapter update"),
        ({}, "not established (the ledger does not record the selection"),
    ],
    ids=["selection recorded", "all recorded", "not recorded"],
)
def test_an_he_runs_report_says_which_tensors_were_encrypted_and_who_could_decrypt(
    recorded: dict[str, JsonValue], said: str
) -> None:
    payload: dict[str, JsonValue] = {
        "secure_aggregation": "he",
        "secure_aggregation_trust": "homomorphic encryption under ONE secret key",
        **recorded,
    }
    start = Entry(1, EntryKind.RUN_STARTED, "", payload, "", "", "")

    privacy = privacy_of([start], None)

    assert privacy.he_tensors is not None and privacy.he_tensors.startswith(said)
    assert privacy.update_visibility == "homomorphic encryption under ONE secret key"
    assert (
        privacy_of([Entry(1, EntryKind.RUN_STARTED, "", {}, "", "", "")], None).he_tensors is None
    )


def test_gold_figures_are_said_to_be_the_coordinators_bound_by_its_signed_ledger(
    plain_run: Path, tmp_path: Path
) -> None:
    _, html = _report(plain_run, tmp_path / "report.html")

    text = _visible_text(html)
    assert "not signed in the ledger" not in text
    assert "hashed into that round's coordinator-signed ledger entry" in text
    assert "fedsilo audit verify checks metrics.jsonl and every checkpoint's round.json" in text
    assert "The sites do not sign them" in text
    assert "without the gold set and the base model" in text
    assert "metrics not in the ledger" not in text


def test_a_simulated_run_says_so_at_the_top_and_never_claims_records_stayed_at_sites(
    plain_run: Path, tmp_path: Path
) -> None:
    _, html = _report(plain_run, tmp_path / "report.html")

    text = _visible_text(html)
    assert "Kind federated run, simulated on one machine, not a deployment" in text
    said = text.index("This run was a simulation on one machine, not a deployment")
    assert said < text.index("Ledger verification")
    assert "All 3 sites ran inside the coordinator's own process" in text
    assert "The private signing keys of all 3 sites are in the run folder" in text
    assert "not that separate parties took part" in text
    assert "Raw records never leave a site" not in text  # no DP: the note once claimed it


def test_final_adapter_is_named_by_the_file_hash_the_ledger_records(
    plain_run: Path, tmp_path: Path
) -> None:
    finished = read_entries(plain_run / "ledger.db")[-1]
    weights = hashlib.sha256((plain_run / "final" / "adapter_model.safetensors").read_bytes())

    _, html = _report(plain_run, tmp_path / "report.html")

    assert finished.payload["final_files"]["adapter_model.safetensors"] == weights.hexdigest()  # type: ignore[call-overload,index]
    assert (
        f'<dt>final/adapter_model.safetensors sha256</dt><dd><span class="hash">'
        f"{weights.hexdigest()}</span>"
    ) in html
    assert (
        f'<dt>Checkpoint adapter sha256 (round 2)</dt><dd><span class="hash">'
        f"{finished.payload['final_adapter_sha256']}</span>"
    ) in html
    assert "Final adapter sha256" not in html


def test_strategy_shows_the_server_momentum_the_ledger_records(
    plain_run: Path, tmp_path: Path
) -> None:
    _, html = _report(plain_run, tmp_path / "report.html")

    assert "<dt>Strategy</dt><dd>fedavg, server momentum 0.5 " in html


def test_gold_intervals_and_precision_say_what_they_are(plain_run: Path, tmp_path: Path) -> None:
    records = RunFolder(plain_run).read_metrics()
    collapsed = [r["round"] for r in records if r["gold_category_accuracy_ci95"] == [0.0, 0.0]]
    assert collapsed  # the tiny model gets no gold record right
    one_sided, clopper_pearson = exact_bounds_at_zero(records[0]["gold_count"])

    _, html = _report(plain_run, tmp_path / "report.html")

    text = _visible_text(html)
    assert "Intervals are 95% percentile-bootstrap intervals" in text
    rounds = ", ".join(str(r) for r in collapsed)
    plural = "s" if len(collapsed) > 1 else ""
    assert f"the rounds table's category after round{plural} {rounds}" in text
    assert f"the exact one-sided 95% upper bound is {one_sided:.2%}" in text
    assert f"Clopper-Pearson interval is 0% to {clopper_pearson:.2%}" in text
    assert "<dt>Precision</dt><dd>fp32 " in html
    assert "every weight in fp32 during local training at every simulated site" in text


def _epsilon_rows(text: str) -> list[str]:
    return re.findall(r"record-level DP-SGD \S+ \S+ round 1: [^A-Z]*", text)


def _edit_config(run: Path) -> None:
    """config.toml as someone might edit it after the run: another delta, accountant, secure
    aggregation mode and number of rounds (it still parses; its digest is no longer the
    ledger's)."""
    path = run / "config.toml"
    text = path.read_text()
    for old, new in (
        ("delta = 1e-05", "delta = 0.001"),
        ('accountant = "rdp"', 'accountant = "pld"'),
        ('[secure_aggregation]\nmode = "none"', '[secure_aggregation]\nmode = "secagg"'),
        ("rounds = 2\n", "rounds = 9\n"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)


@pytest.mark.parametrize("change", ["edited", "deleted"])
def test_the_privacy_section_states_the_ledgers_settings_whatever_config_toml_says(
    dp_run_with_refusal: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: str,
) -> None:
    run, _ = dp_run_with_refusal
    _, honest = _report(run, tmp_path / "honest.html", "--coordinator-key", _pinned_key(run))
    main(["privacy", str(run)])
    honest_privacy = capsys.readouterr().out
    if change == "edited":
        _edit_config(run)
    else:
        (run / "config.toml").unlink()

    code, html = _report(run, tmp_path / "report.html", "--coordinator-key", _pinned_key(run))

    assert code == 0  # config.toml is not evidence: verification does not depend on it
    text = _visible_text(html)
    assert "Settings read from the ledger's run_started entry" in text
    assert "Accountant rdp \u03b4 1e-05 Secure aggregation none " in text
    assert "secagg" not in text and "pld" not in text and "0.001" not in text
    assert "No differential privacy event" not in text
    assert _epsilon_rows(text) == _epsilon_rows(_visible_text(honest)) != []
    assert "planned" not in text and "Task not recorded" in text
    assert main(["privacy", str(run)]) == 0
    output = capsys.readouterr().out
    assert "DP settings from the ledger's run_started entry" in output
    epsilons = [line for line in output.splitlines() if line.endswith(("yes", "NO"))]
    assert epsilons == [line for line in honest_privacy.splitlines() if line.endswith("yes")]


def _without_dp_settings(entries: list[Entry]) -> list[Entry]:
    """The entries as a ledger from before run_started recorded the DP settings has them."""
    started = entries[0]
    payload = {k: v for k, v in started.payload.items() if k != "differential_privacy"}
    return [dataclasses.replace(started, payload=payload), *entries[1:]]


def test_dp_events_are_never_reported_absent_when_the_settings_are_not_established(
    dp_run_with_refusal: tuple[Path, str],
) -> None:
    run, _ = dp_run_with_refusal
    entries = _without_dp_settings(read_entries(run / "ledger.db"))
    (run / "config.toml").unlink()
    data = build_report_data(run, verify_run(run), key_source="folder")

    privacy = privacy_of(entries, None)
    text = _visible_text(render_report(dataclasses.replace(data, privacy=privacy)))

    assert privacy.events_recorded and not privacy.epsilon and privacy.delta is None
    assert privacy.mode.startswith("record-level DP-SGD, as the ledger's DP events show")
    assert "No differential privacy event" not in text
    assert "The ledger holds differential privacy events, but no epsilon is shown" in text
    assert "\u03b5 is not computed: it needs the run's accountant and \u03b4" in text
    assert "Settings read from not established" in text


def test_a_tampered_dp_event_gets_a_fail_report_naming_it(
    dp_run_with_refusal: tuple[Path, str], tmp_path: Path
) -> None:
    run, _ = dp_run_with_refusal
    with sqlite3.connect(run / "ledger.db") as db:
        seq, payload = db.execute(
            "SELECT seq, payload FROM entries WHERE kind = 'update_received' ORDER BY seq"
        ).fetchone()
        edited = json.loads(payload)
        edited["dp_event"]["steps"] = 0
        db.execute("UPDATE entries SET payload = ? WHERE seq = ?", (payload_json(edited), seq))

    code, html = _report(run, tmp_path / "report.html", "--coordinator-key", _pinned_key(run))

    assert code == 1
    text = _visible_text(html)
    assert 'class="banner fail"' in html
    assert f"entry {seq}: DP event unreadable (site " in text
    assert "steps must be >= 1, got 0" in text
    assert "Final \u03b5" in text  # the other events still give each site's epsilon


def test_an_epsilon_that_cannot_be_computed_is_said_so(
    dp_run_with_refusal: tuple[Path, str],
) -> None:
    run, _ = dp_run_with_refusal
    entries = read_entries(run / "ledger.db")
    # Round 2's last update: its site also sent a record-level event in round 1.
    update = next(e for e in reversed(entries) if e.kind is EntryKind.UPDATE_RECEIVED)
    site = str(update.payload["site_id"])
    # A site-level event among a site's record-level ones: different units, no one epsilon.
    mixed = {
        **update.payload,
        "dp_event": {
            "type": "sampled_sites_gaussian",
            "noise_multiplier": 1.0,
            "sites_per_round": 2,
            "num_sites": 3,
            "rounds": 1,
        },
    }
    edited = [dataclasses.replace(e, payload=mixed) if e is update else e for e in entries]

    privacy = privacy_of(edited, load_config(run / "config.toml"))

    assert site not in privacy.epsilon
    assert any(
        note.startswith(f"site {site!r}: \u03b5 not computed:") and "different units" in note
        for note in privacy.notes
    )


def test_the_report_says_how_many_receipts_were_examined(
    dp_run_with_refusal: tuple[Path, str], tmp_path: Path
) -> None:
    run, _ = dp_run_with_refusal
    held = len(list(run.glob("sites/*/receipts/*/*.json")))
    _, with_receipts = _report(run, tmp_path / "a.html")
    for receipts in run.glob("sites/*/receipts"):
        shutil.rmtree(receipts)

    code, without = _report(run, tmp_path / "b.html")

    assert held > 0 and f"Site receipts {held} examined" in _visible_text(with_receipts)
    assert code == 0
    text = _visible_text(without)
    assert "checkpoints and metrics all hold; 0 receipts examined (none in the run folder)" in text
    assert "receipts all hold" not in text
    assert "Site receipts 0 receipts examined (none in the run folder)" in text


def test_site_level_dp_with_no_recorded_secure_aggregation_mode_is_not_called_distributed() -> None:
    def entry(seq: int, kind: EntryKind, payload: dict[str, JsonValue]) -> Entry:
        return Entry(seq, kind, "2026-01-01T00:00:00.000000Z", payload, "", "", "")

    event: dict[str, JsonValue] = {
        "type": "sampled_sites_gaussian",
        "noise_multiplier": 1.0,
        "sites_per_round": 3,
        "num_sites": 3,
        "rounds": 1,
    }
    entries = [
        entry(1, EntryKind.RUN_STARTED, {}),
        entry(2, EntryKind.ROUND_AGGREGATED, {"round": 1, "site_dp_event": event, "sites": []}),
    ]

    privacy = privacy_of(entries, None)

    assert "distributed" not in privacy.mode
    assert "the secure-aggregation mode is not recorded" in privacy.mode
