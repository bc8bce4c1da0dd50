"""Site-level DP against federation size: the benchmarks page's section and the compliance table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from report_privacy import replace_between

DOCS = Path(__file__).resolve().parent.parent / "docs"
COMPLIANCE_PAGE = DOCS / "privacy-for-compliance.md"
_MARKERS = ("<!-- site-level-table -->", "<!-- end-site-level-table -->")


def _share(row: dict[str, Any]) -> str:
    share, interval = row.get("share_of_non_private"), row.get("share_ci95")
    if row["setting"] == "no_dp":
        return "(the reference)"
    if share is None:
        return "-"
    text = f"{100 * share:.0f}%"
    if interval:
        text += f" [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]"
    return text


def _setting(row: dict[str, Any]) -> str:
    secure = "secagg" in row["setting"]
    if row["epsilon"] is None:
        return "no DP, under secure aggregation" if secure else "no DP"
    if secure:
        return f"epsilon {row['epsilon']:g}, distributed DP under secure aggregation"
    return f"epsilon {row['epsilon']:g}, central"


def site_dp_table(result: dict[str, Any]) -> list[str]:
    """One line per federation size and setting: noise, gold loss, share of the no-DP gain."""
    lines = [
        "| sites | per round | setting | noise multiplier | seeds | gold loss (95% CI) | "
        "share of the no-DP loss drop (95% CI) |",
        "|---:|---:|---|---:|---:|---|---|",
    ]
    order = {"no_dp": 0}

    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        secure = "secagg" in row["setting"]
        epsilon = row["epsilon"] if row["epsilon"] is not None else math.inf
        return row["sites"], row["sites_per_round"], secure, -epsilon, order.get(row["setting"], 1)

    for row in sorted(result["rows"], key=key):
        noise = row["noise_multiplier"]
        interval = row.get("gold_loss_ci95")
        loss = f"{row['gold_loss']:.3f}"
        if interval:
            loss += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
        lines.append(
            f"| {row['sites']:,} | {row['sites_per_round']:,} | {_setting(row)} | "
            f"{'-' if noise is None else f'{noise:.2f}'} | {len(row['seeds'])} | {loss} | "
            f"{_share(row)} |"
        )
    return lines


def site_dp_section(result: dict[str, Any] | None) -> list[str]:
    lines = ["## Site-level DP against the size of the federation", ""]
    if result is None:
        return [*lines, "Not measured yet: run `python benchmarks/site_level_dp.py`.", ""]
    lines += [
        f"`python benchmarks/site_level_dp.py` on the {result['model']} (so that 1,000 simulated "
        f"sites train on one CPU thread): each site holds {result['records_per_site']} "
        "ICD-10-CM records (Dirichlet(1) over chapters) and takes "
        f"{result['local_steps']} local steps of {result['batch_size']} per round "
        f"(learning rate {result['learning_rate']:g}) for {result['rounds']} rounds of FedAvg; "
        "each round draws its sites at random (fixed size, without replacement). Site-level "
        f"DP at delta {result['delta']:g}: the noise multiplier is the smallest the accountant "
        "allows for the whole run; the clip norm is the "
        f"{result['clip_rule']}. Utility: the drop of the gold loss (answer cross-entropy on "
        f"up to {result['gold_size']} held-out codes) from the untrained model, as a share of "
        "the drop without DP at the same size, per seed; mean and 95% t-interval over seeds. "
        "Distributed DP: the sites add the noise themselves under secure aggregation; each "
        "adds enough that any majority of the round's cohort reaches the central noise, so a "
        "full cohort carries more noise than central DP at the same epsilon.",
        "",
        *site_dp_table(result),
        "",
        "The noise on the averaged update is about `z x S / m` per coordinate for `m` sites per "
        "round, while the clipped mean update has norm at most `S`: the noise-to-signal ratio "
        "grows with the square root of the adapter's size `d`. This model's adapter has 17,408 "
        "parameters; SmolLM2-135M's rank-8 adapter has 2.4 million, about 12 times the square "
        "root, so the same utility needs about 12 times as many sites per round "
        "([privacy-for-compliance.md](privacy-for-compliance.md)).",
        "",
    ]
    return lines


def fill_compliance_site_table(result: dict[str, Any] | None, page: Path = COMPLIANCE_PAGE) -> None:
    """Rewrite the compliance page's site-level table (between its markers) from the results."""
    table = (
        site_dp_table(result)
        if result is not None
        else ["Not measured yet: run `python benchmarks/site_level_dp.py`."]
    )
    replace_between(page, _MARKERS, table)
