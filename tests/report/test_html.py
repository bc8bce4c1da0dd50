import dataclasses
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from markupsafe import escape

from fedsilo.report import DeclaredPolicy, Fact, PartRow, ReportData, render_report, write_report
from fedsilo.report.model import Execution
from tests.report.conftest import ADAPTER_HASHES, HOSTILE_SITE, REJECTION_REASON, make_report_data

_SVG = re.compile(r"<svg\b.*?</svg>", re.DOTALL)


def _escaped(text: str) -> str:
    """``text`` as the report's template escapes it."""
    return str(escape(text))


def test_every_site_and_fingerprint_appears(report_data: ReportData) -> None:
    page = render_report(report_data)

    for site in report_data.sites:
        assert _escaped(site.name) in page
        assert _escaped(site.fingerprint) in page


def test_every_update_digest_and_reason_appears(report_data: ReportData) -> None:
    page = render_report(report_data)

    for update in report_data.updates:
        assert _escaped(update.detail) in page
    assert _escaped(REJECTION_REASON) in page


def test_provenance_values_appear(report_data: ReportData) -> None:
    page = render_report(report_data)

    for value in (report_data.run_name, report_data.generated_at):
        assert _escaped(value) in page
    for fact in report_data.facts:
        assert f"<dt>{_escaped(fact.label)}</dt>" in page
        assert _escaped(fact.value) in page
    assert report_data.verification.coordinator_fingerprint in page


def test_adapter_hashes_are_shown_whole(report_data: ReportData) -> None:
    page = render_report(report_data)

    for digest in ADAPTER_HASHES:
        assert f'<span class="hash">{digest}</span>' in page
        assert "\u2026" not in page


def test_passing_verification_shows_pass_banner(report_data: ReportData) -> None:
    page = render_report(report_data)

    assert 'class="banner pass"' in page
    assert ">PASS<" in page
    assert ">FAIL<" not in page
    assert _escaped(report_data.verification.summary) in page


def test_failing_verification_shows_fail_banner_with_problems() -> None:
    problems = ("entry 4: signature does not verify", "round 2: digest <mismatch>")
    data = make_report_data(verify_ok=False, problems=problems)

    page = render_report(data)

    assert 'class="banner fail"' in page
    assert ">FAIL<" in page
    assert ">PASS<" not in page
    for problem in problems:
        assert f"<li>{_escaped(problem)}</li>" in page


def test_hostile_site_name_is_escaped_and_no_script_tag_exists(report_data: ReportData) -> None:
    page = render_report(report_data)

    assert _escaped(HOSTILE_SITE) in page
    assert "<script" not in page.lower()


def test_no_network_urls_anywhere() -> None:
    data = make_report_data(epsilon={"st-mary": ((1, 0.5), (2, 0.9))}, delta=1e-5)

    page = render_report(data)

    assert "http://" not in page
    assert "https://" not in page


def test_no_external_resources_can_be_referenced(report_data: ReportData) -> None:
    page = render_report(report_data).lower()

    for marker in ("<link", "<script", "<img", "<iframe", "@import", "url(", " src=", " href="):
        assert marker not in page


def test_content_security_policy_forbids_fetches(report_data: ReportData) -> None:
    page = render_report(report_data)

    assert "content=\"default-src 'none'; style-src 'unsafe-inline'\"" in page


def test_every_svg_is_well_formed_xml() -> None:
    data = make_report_data(epsilon={HOSTILE_SITE: ((1, 0.5), (2, 0.9))}, delta=1e-5)

    svgs = _SVG.findall(render_report(data))

    assert len(svgs) == 3
    for svg in svgs:
        assert ET.fromstring(svg).tag == "svg"


def test_without_dp_the_epsilon_chart_is_replaced_by_a_note(report_data: ReportData) -> None:
    page = render_report(report_data)

    assert "No differential privacy event is recorded in the ledger" in page
    assert len(_SVG.findall(page)) == 2


def test_with_dp_final_epsilon_and_delta_are_shown() -> None:
    data = make_report_data(epsilon={"st-mary": ((1, 0.5), (2, 0.875))}, delta=1e-5)

    page = render_report(data)

    assert "No differential privacy event" not in page
    assert "\u03b4 = 1e-05" in page
    assert '<td class="num">0.8750</td>' in page


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def test_privacy_has_one_row_per_site_with_its_mode_and_epsilon_after_each_round() -> None:
    data = make_report_data(epsilon={"st-mary": ((1, 0.5), (2, 0.875))}, delta=1e-5)
    modes = {"st-mary": "record-level DP-SGD", "county-general": "none"}
    data = dataclasses.replace(data, privacy=dataclasses.replace(data.privacy, site_modes=modes))

    text = _text(render_report(data))

    row = "st-mary record-level DP-SGD rdp 1e-05 round 1: 0.5000; round 2: 0.8750 0.8750 \u2014"
    assert row in text
    assert "county-general none \u2014 \u2014 \u2014 \u2014 \u2014" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; no update accepted" in text


def test_a_site_under_site_level_dp_shows_the_site_level_epsilon_in_its_row() -> None:
    data = make_report_data()
    privacy = dataclasses.replace(
        data.privacy,
        mode="site-level",
        accountant="rdp",
        delta=1e-5,
        site_level_epsilon=((1, 0.25), (2, 0.375)),
        site_modes={"st-mary": "site-level (the coordinator clips and noises)"},
    )

    text = _text(render_report(dataclasses.replace(data, privacy=privacy)))

    row = (
        "st-mary site-level (the coordinator clips and noises) rdp 1e-05 "
        "site-level: round 1: 0.2500; round 2: 0.3750 \u2014 0.3750"
    )
    assert row in text


def test_each_declared_policy_of_a_site_is_shown_with_its_rounds() -> None:
    data = make_report_data()
    old, new = "1f" * 32, "2e" * 32
    changed = dataclasses.replace(
        data.sites[0],
        policies=(DeclaredPolicy(old, 2, (1, 2)), DeclaredPolicy(new, 3, (3,))),
    )
    without = dataclasses.replace(
        data.sites[1], policies=(DeclaredPolicy(None, 1, (1, 2)),), undeclared=1
    )

    text = _text(
        render_report(dataclasses.replace(data, sites=(changed, without, *data.sites[2:])))
    )

    assert f"st-mary {old} 2 1, 2 " in text and f"st-mary {new} 3 3 " in text
    assert "county-general none: the site trains without a policy 1 1, 2 " in text
    assert "county-general not declared in 1 accepted update(s)" in text
    assert "no update accepted: nothing declared" in text  # the hostile site declared nothing


def test_missing_train_loss_is_a_dash_not_zero(report_data: ReportData) -> None:
    page = render_report(report_data)

    round_zero = re.search(r'<tr><td class="num">0</td>.*?</tr>', page)

    assert round_zero is not None
    assert "\u2014" in round_zero.group(0)


def test_empty_run_renders_placeholders() -> None:
    data = dataclasses.replace(
        make_report_data(verify_ok=False, problems=("run folder: the ledger has no entries",)),
        sites=(),
        rounds=(),
        updates=(),
    )

    page = render_report(data)

    assert "No rounds are recorded" in page
    assert "No updates are recorded" in page


def test_nan_metric_is_refused() -> None:
    data = make_report_data(epsilon={"st-mary": ((1, float("nan")),)})

    with pytest.raises(ValueError, match="st-mary"):
        render_report(data)


def test_write_report_writes_the_rendered_page(tmp_path: Path, report_data: ReportData) -> None:
    target = tmp_path / "out" / "report.html"

    write_report(report_data, target)

    assert target.read_text(encoding="utf-8") == render_report(report_data)
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_failed_run_is_red_even_when_the_ledger_verifies() -> None:
    page = render_report(make_report_data(status="failed"))

    assert 'class="banner fail"' in page
    assert 'class="banner pass"' not in page
    assert "The run failed" in page
    assert "fewer than min_sites" in page


def test_running_run_is_never_green() -> None:
    page = render_report(make_report_data(status="running"))

    assert 'class="banner warn"' in page
    assert 'class="banner pass"' not in page
    assert "NOT FINISHED" in page


def test_key_from_the_folder_is_a_visible_warning() -> None:
    pinned = render_report(make_report_data(key_source="auditor"))
    folder = render_report(make_report_data(key_source="folder"))

    assert "pinned by the auditor" in pinned
    assert 'class="warning"' not in pinned
    assert 'class="warning"' in folder
    assert "The coordinator key was taken from the run folder." in folder


def test_bidi_override_in_a_site_name_is_neutralised() -> None:
    data = make_report_data()
    spoofed = dataclasses.replace(data.sites[0], name="st-mary\u202egnp.exe")
    page = render_report(dataclasses.replace(data, sites=(spoofed, *data.sites[1:])))

    assert "\u202e" not in page
    assert "st-mary\ufffdgnp.exe" in page


def test_gold_parts_and_category_interval_are_shown_when_present() -> None:
    data = make_report_data()
    last = dataclasses.replace(data.rounds[-1], category_ci95=(0.5, 0.75))
    data = dataclasses.replace(
        data,
        rounds=(*data.rounds[:-1], last),
        gold_parts=(PartRow("phrasings", "accuracy", 0.4, (0.25, 0.55), 20),),
    )

    page = render_report(data)

    assert "[50.0%, 75.0%]" in page
    assert "<td>phrasings</td><td>accuracy</td>" in page and "25.0% &ndash; 55.0%" in page


def test_round_missing_from_the_ledger_is_marked_unverified() -> None:
    data = make_report_data()
    stray = dataclasses.replace(data.rounds[-1], adapter_sha256=None)

    page = render_report(dataclasses.replace(data, rounds=(*data.rounds[:-1], stray)))

    assert page.count("not in the ledger: metrics unverified") == 1


def test_withheld_example_count_is_said_withheld_never_a_number() -> None:
    data = make_report_data()
    private = dataclasses.replace(
        data.rounds[1], examples=None, examples_withheld="withheld (record-level DP)"
    )
    data = dataclasses.replace(
        data, rounds=(data.rounds[0], private, data.rounds[2]), examples_note="Placeholder: 1."
    )

    text = _text(render_report(data))

    assert "1 st-mary, county-general withheld (record-level DP) 2.7500" in text
    assert "Placeholder: 1." in text


def test_example_count_cannot_be_both_shown_and_withheld() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        dataclasses.replace(make_report_data().rounds[1], examples_withheld="withheld (DP)")


_SIMULATION = Execution(
    "simulation",
    "fedsilo's in-process engine on one machine",
    ("All 3 sites ran inside the coordinator's own process.",),
)


def test_a_simulation_is_said_so_before_anything_else_and_claims_no_record_separation() -> None:
    page = render_report(dataclasses.replace(make_report_data(), execution=_SIMULATION))

    text = _text(page)
    said = text.index("This run was a simulation on one machine, not a deployment")
    assert said < text.index("Ledger verification") < text.index("Privacy")
    assert _escaped("All 3 sites ran inside the coordinator's own process.") in text
    assert "Raw records never leave a site" not in text


def test_only_a_deployment_keeps_the_raw_records_claim() -> None:
    deployed = Execution("deployment", "deployment: SuperLink and SuperNodes")

    page = render_report(dataclasses.replace(make_report_data(), execution=deployed))

    assert "Raw records never leave a site" in page
    assert 'class="caveat"' not in page


def test_ranking_figures_show_their_candidates_and_what_chance_gives() -> None:
    parts = (
        PartRow("ranking", "top1", 0.785, (0.725, 0.845), 200, candidates=10, chance=0.1),
        PartRow("ranking", "top5", 0.995, (0.985, 1.0), 200, candidates=10, chance=0.5),
        PartRow("unseen-code", "accuracy", 0.12, (0.075, 0.165), 200),
    )

    text = _text(render_report(dataclasses.replace(make_report_data(), gold_parts=parts)))

    assert "ranking top1 among 10 candidates 78.5% 72.5% &ndash; 84.5% 200 10.0%" in text
    assert "ranking top5 among 10 candidates 99.5%" in text and "200 50.0%" in text
    assert "unseen-code accuracy 12.0% 7.5% &ndash; 16.5% 200 \u2014" in text
    assert "ranking at random gives 1/10 and 5/10" in text


def test_point_intervals_are_marked_and_explained_only_where_they_occur() -> None:
    data = make_report_data()
    point = dataclasses.replace(data.rounds[0], category_ci95=(0.0, 0.0))
    spread = dataclasses.replace(data.rounds[1], category_ci95=(0.25, 0.75))
    with_point = dataclasses.replace(
        data,
        rounds=(point, spread, data.rounds[2]),
        interval_note="Intervals are 95% percentile-bootstrap intervals.",
        interval_caveats=("category after round 0: 0 of 8 records right",),
    )
    without = dataclasses.replace(
        data,
        rounds=(spread, *data.rounds[1:]),
        interval_note="Intervals are 95% percentile-bootstrap intervals.",
    )

    marked, plain = render_report(with_point), render_report(without)

    assert marked.count("&dagger;") == 2  # the marked cell and the caveat's heading
    assert "[0.0%, 0.0%]&dagger;" in marked and "[25.0%, 75.0%]&dagger;" not in marked
    assert "category after round 0: 0 of 8 records right" in marked
    assert "&dagger;" not in plain and "understate" not in plain
    assert "Intervals are 95% percentile-bootstrap intervals." in plain


def test_a_round_whose_metrics_the_ledger_does_not_bind_is_marked() -> None:
    data = make_report_data()
    unbound = dataclasses.replace(data.rounds[2], metrics_ledgered=False)

    page = render_report(dataclasses.replace(data, rounds=(*data.rounds[:2], unbound)))

    assert page.count("metrics not in the ledger: unverified") == 1


def test_a_fact_note_says_what_the_value_is_of() -> None:
    fact = Fact("final/adapter_model.safetensors sha256", "88" * 32, True, "hash of the file")

    page = render_report(dataclasses.replace(make_report_data(), facts=(fact,)))

    assert (
        f'<span class="hash">{"88" * 32}</span> <span class="subtitle">(hash of the file)' in page
    )
