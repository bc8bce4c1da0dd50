"""What the compliance report says about its figures: example counts, gold scores, intervals.

An example count is shown only where every summed site sent its own; under record-level DP a
site sends a placeholder weight instead, and under secure aggregation none at all. Gold scores
are the coordinator's, bound to the ledger by digest. Their intervals are percentile
bootstraps, which collapse to a point when no (or every) record is right: the report says so
there, with the exact binomial bounds where the figure is a share of right records.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from fedsilo.evaluation.bootstrap import exact_bounds_at_zero
from fedsilo.evaluation.metrics import RIGHT_OR_WRONG
from fedsilo.ledger import Entry, EntryKind
from fedsilo.report.model import PartRow, RoundRow
from fedsilo.report.numbers import recorded_float

RECORD_LEVEL_DP = "record-level DP"
SECURE_AGGREGATION = "secure aggregation"
_RANKING_FIGURES: Mapping[str, int] = {"top1": 1, "top5": 5}


def round_examples(entries: Sequence[Entry]) -> dict[int, tuple[int | None, str | None]]:
    """Round -> (total example count, None) where every summed site sent its own count, or
    (None, why not) where a summed site withheld it; (None, None) where the ledger cannot say.
    """
    start = next((e.payload for e in entries if e.kind is EntryKind.RUN_STARTED), {})
    secure = start.get("secure_aggregation") not in (None, "none")
    updates: dict[tuple[int, str], Mapping[str, Any]] = {}
    for entry in entries:
        round_number = entry.payload.get("round")
        if entry.kind is EntryKind.UPDATE_RECEIVED and isinstance(round_number, int):
            # A retried round's last accepted update of a site is the one that was summed.
            updates[(round_number, str(entry.payload.get("site_id")))] = entry.payload
    counts: dict[int, tuple[int | None, str | None]] = {}
    for entry in entries:
        round_number = entry.payload.get("round")
        sites = entry.payload.get("sites")
        if entry.kind is not EntryKind.ROUND_AGGREGATED or not isinstance(round_number, int):
            continue
        sent = (
            [updates.get((round_number, str(s))) for s in sites] if isinstance(sites, list) else []
        )
        reasons = []
        if any(u is not None and isinstance(u.get("dp_event"), dict) for u in sent):
            reasons.append(RECORD_LEVEL_DP)
        if secure:
            reasons.append(SECURE_AGGREGATION)
        signed = [u.get("num_examples") if u is not None else None for u in sent]
        if reasons:
            counts[round_number] = (None, f"withheld ({' and '.join(reasons)})")
        elif signed and all(isinstance(n, int) and not isinstance(n, bool) for n in signed):
            # The sum of the counts the sites signed (verify holds each entry's count to its
            # signature), not the total the coordinator wrote beside the aggregate.
            counts[round_number] = (sum(int(n) for n in signed if isinstance(n, int)), None)
        else:
            counts[round_number] = (None, None)
    return counts


def examples_note(rows: Sequence[RoundRow], entries: Sequence[Entry]) -> str | None:
    """What the Examples column holds, and how the coordinator weighed the updates."""
    withheld = " ".join(row.examples_withheld or "" for row in rows)
    notes = []
    if RECORD_LEVEL_DP in withheld:
        notes.append(
            "Under record-level DP a site releases no example count: it sends a placeholder "
            "count of 1 with each update, so the coordinator weighed the summed updates "
            "equally, and the per-round total in the ledger is the number of sites summed, "
            "not a number of examples; it is not shown."
        )
    if SECURE_AGGREGATION in withheld:
        notes.append(
            "Under secure aggregation the sites send no example count: the coordinator learns "
            "only how many sites were summed, and weighs them equally."
        )
    if any(row.examples is not None and row.round > 0 for row in rows):
        site_level = {
            e.payload.get("round")
            for e in entries
            if e.kind is EntryKind.ROUND_AGGREGATED
            and isinstance(e.payload.get("site_dp_event"), dict)
        }
        weighed = (
            "Under site-level DP the coordinator weighed the clipped updates equally"
            if site_level
            else "The coordinator weighed each update by its site's count"
        )
        notes.append(
            "Examples: the sum of the summed sites' training-set sizes, as each site signed "
            "its own with its update (its claim, not proven); not the number of examples "
            f"trained on in the round. {weighed}."
        )
    return " ".join(notes) or None


def metric_note(meaning: str, *, gold_count: int | None, all_ledgered: bool) -> str:
    """Whose the gold figures are, what binds them, and what it takes to reproduce them."""
    records = f" of {gold_count} records" if gold_count is not None else ""
    uncovered = "" if all_ledgered else " (except in rounds marked as not in the ledger)"
    return (
        f"{meaning}. Accuracy, loss and their intervals are the coordinator's own figures: it "
        f"scored each round's aggregate adapter on its gold set{records} (metrics.jsonl). Each "
        "round's metrics record is hashed into that round's coordinator-signed ledger entry, "
        "and fedsilo audit verify checks metrics.jsonl and every checkpoint's round.json "
        f"against it{uncovered}: a figure changed after its round was recorded is detected "
        "(tamper-evident), which does not show that the coordinator computed it correctly. "
        "The sites do not sign them, and they cannot be reproduced independently without the "
        "gold set and the base model (and the round's adapter, whose sha256 is shown)."
    )


def interval_note(metric: str) -> str:
    """How every gold interval of the report was computed."""
    pooled = ", tokens pooled within each resample" if metric == "next-token" else ""
    return (
        "Intervals are 95% percentile-bootstrap intervals: the figure's gold records (Gold n) "
        f"resampled with replacement{pooled}, and the 2.5th and 97.5th percentiles of the "
        "figure over the resamples (fedsilo.evaluation.bootstrap)."
    )


def _right_or_wrong(metric: str, figure: str) -> bool:
    if figure in _RANKING_FIGURES:
        return True
    accuracy, secondary = RIGHT_OR_WRONG.get(metric, (False, False))
    return accuracy if figure == "accuracy" else secondary


def _caveat(places: Sequence[str], *, value: float, count: int, right_or_wrong: bool) -> str:
    where = "; ".join(places)
    percent = f"{value:.1%}"
    if not right_or_wrong or value not in (0.0, 1.0):
        return (
            f"{where}: every one of the {count} gold records scored the same, so every "
            f"resample gives {percent} and the interval is a point, which understates the "
            "uncertainty (the figure is not a share of right records, so no exact binomial "
            "bound is given)."
        )
    one_sided, clopper_pearson = exact_bounds_at_zero(count)
    if value == 0:
        right = f"0 of {count} records right"
        bounds = (
            f"the exact one-sided 95% upper bound is {one_sided:.2%}, and the two-sided 95% "
            f"Clopper-Pearson interval is 0% to {clopper_pearson:.2%}"
        )
    else:
        right = f"{count} of {count} records right"
        bounds = (
            f"the exact one-sided 95% lower bound is {1 - one_sided:.2%}, and the two-sided "
            f"95% Clopper-Pearson interval is {1 - clopper_pearson:.2%} to 100%"
        )
    return (
        f"{where}: {right}, so every resample gives {percent} and the bootstrap interval "
        f"collapses to the point [{percent}, {percent}], which understates the uncertainty: "
        f"{bounds}."
    )


def interval_caveats(
    rows: Sequence[RoundRow], parts: Sequence[PartRow], *, metric: str, secondary: str
) -> tuple[str, ...]:
    """One caveat per kind of point interval the report shows (marked with a dagger), naming
    where each occurs; none where no interval collapsed."""
    places: dict[tuple[bool, float, int], list[str]] = defaultdict(list)
    rounds: dict[tuple[bool, float, int], list[int]] = defaultdict(list)
    for row in rows:
        value = row.gold_category_accuracy
        if row.category_interval_is_point and value is not None and row.gold_count:
            rounds[(_right_or_wrong(metric, "category_accuracy"), value, row.gold_count)].append(
                row.round
            )
    for key, numbers in rounds.items():
        listed = ", ".join(str(n) for n in numbers)
        places[key].append(
            f"the rounds table's {secondary} after round{'s' if len(numbers) > 1 else ''} {listed}"
        )
    for part in parts:
        if part.interval_is_point and part.count:
            figure = part.figure.replace(" ", "_")
            key = (_right_or_wrong(metric, figure), part.value, part.count)
            places[key].append(f"{part.part} {part.figure} after the last round")
    return tuple(
        _caveat(where, value=value, count=count, right_or_wrong=binary)
        for (binary, value, count), where in places.items()
    )


def ranking_chance(figure: str, candidates: object) -> tuple[int | None, float | None]:
    """For a top-k figure: the candidate count recorded with it and the rate ranking at
    random gives a record with that many candidates (k / candidates)."""
    k = _RANKING_FIGURES.get(figure)
    if k is None or not isinstance(candidates, int) or isinstance(candidates, bool):
        return None, None
    if candidates < 1:
        return None, None
    return candidates, min(1.0, k / candidates)


def float_pair(value: object) -> tuple[float, float] | None:
    """A recorded interval ``[low, high]`` as a pair of floats, None where it is not one."""
    if isinstance(value, list | tuple) and len(value) == 2:
        low, high = map(recorded_float, value)
        if low is not None and high is not None:
            return low, high
    return None


_PART_FIGURES = ("accuracy", "category_accuracy", "top1", "top5")


def gold_parts_of(record: Mapping[str, Any]) -> tuple[PartRow, ...]:
    """The gold parts of a round's metrics ``record`` (the ledgered one: see
    :func:`fedsilo.server.report_data.last_verified_record`), figures as recorded."""
    parts = record.get("gold_parts")
    if not isinstance(parts, dict):
        return ()
    rows: list[PartRow] = []
    for part, figures in sorted(parts.items()):
        if not isinstance(figures, dict):
            continue
        count = figures.get("count")
        for figure in _PART_FIGURES:
            value = recorded_float(figures.get(figure))
            if value is not None:
                candidates, chance = ranking_chance(figure, figures.get("candidates"))
                rows.append(
                    PartRow(
                        part=str(part),
                        figure=figure.replace("_", " "),
                        value=value,
                        ci95=float_pair(figures.get(f"{figure}_ci95")),
                        count=count if isinstance(count, int) else None,
                        candidates=candidates,
                        chance=chance,
                    )
                )
    return tuple(rows)
