"""benchmarks/audit_overhead.py: one round ledgers what the federation ledgers, and the page
says whether it was measured at the demo's adapter."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from fedsilo.crypto import generate_private_key
from fedsilo.ledger import EntryKind, Ledger, verify_ledger

from . import BENCHMARKS, benchmark_script


def test_a_round_ledgers_entries_the_verifier_accepts(tmp_path: Path) -> None:
    bench = benchmark_script("audit_overhead")
    shapes = bench.lora_shapes(20_000)
    assert sum(math.prod(shape) for shape in shapes.values()) >= 20_000
    coordinator = generate_private_key()
    sites = [generate_private_key() for _ in range(2)]
    with Ledger.open(tmp_path / "ledger.db", coordinator_key=coordinator) as ledger:
        ledger.append(EntryKind.RUN_STARTED, bench.RUN_STARTED)
        site_s, coordinator_s = bench.one_round(ledger, coordinator, sites, shapes, 1)
    assert len(site_s) == 2 and min(site_s) > 0 and coordinator_s > 0
    report = verify_ledger(
        tmp_path / "ledger.db",
        coordinator_key=coordinator.public_key(),
        site_keys={f"site-{index}": key.public_key() for index, key in enumerate(sites)},
    )
    # run_started, round_opened, a task_sent and an update_received per site, round_aggregated
    assert report.entries == 1 + 1 + 2 + 2 + 1 and not report.problems, report.problems


def test_page_drops_the_size_caution_only_for_the_demos_adapter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # report.py imports its sibling modules
    report = benchmark_script("report")
    demo = json.loads((Path(report.__file__).parent / "results" / "demo.json").read_text())
    config = tomllib.loads(demo["config"])
    built_from = {
        "base": config["model"]["base"],
        "rank": config["lora"]["rank"],
        "target_modules": config["lora"]["target_modules"],
        "sites": config["task"]["num_sites"],
    }
    measured = {"payload_bytes": 19_000_000, "median_audit_s_per_round_one_machine": 0.3}

    def page(**fields: object) -> str:
        return " ".join(report._audit_reference(0.1, demo, {**measured, **fields}))

    own = page(adapter="demo", adapter_built_from=built_from)
    assert "Caution" not in own and "demo's own adapter (19.0 MB" in own
    assert "300 ms" in own  # the demo's round pays every site's signing
    other = page(adapter="lora-shaped")
    assert "Caution" in other and "--demo-adapter" in other
    stale = page(adapter="demo", adapter_built_from={**built_from, "rank": 8})
    assert "Caution" in stale and "rank 8" in stale
