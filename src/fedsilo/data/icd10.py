"""The built-in task: ICD-10-CM coding, with hospital specialties as data silos.

Each record asks for the code of a diagnosis description ("Type 2 diabetes mellitus without
complications" -> "E11.9"). The codes and descriptions come from the ``simple-icd-10-cm``
package, which ships the public-domain ICD-10-CM tabular list, so the task needs no download
and holds no patient data.

Non-IID by construction: an ICD-10-CM chapter is roughly what one specialty codes (chapter 9,
circulatory, is cardiology), so giving each site whole chapters yields sites that have never
seen each other's codes, which is the case federated learning is meant for.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import numpy as np

from fedsilo.config.schema import MetricName
from fedsilo.data.partition import partition_by_group, partition_dirichlet
from fedsilo.data.records import ChatRecord, Record

log = logging.getLogger(__name__)

TASK_NAME = "icd10"

SYSTEM_PROMPT = "You are a clinical coding assistant. Answer with the ICD-10-CM code only."

# Chapter number (as the package spells it) -> the specialty whose records it mostly covers.
# Site names are built from these, so they are unique and contain no spaces.
SPECIALTIES: dict[str, str] = {
    "1": "infectious-disease",
    "2": "oncology",
    "3": "hematology",
    "4": "endocrinology",
    "5": "psychiatry",
    "6": "neurology",
    "7": "ophthalmology",
    "8": "otolaryngology",
    "9": "cardiology",
    "10": "pulmonology",
    "11": "gastroenterology",
    "12": "dermatology",
    "13": "orthopedics",
    "14": "urology",
    "15": "obstetrics",
    "16": "neonatology",
    "17": "medical-genetics",
    "18": "internal-medicine",
    "19": "trauma-surgery",
    "20": "emergency-medicine",
    "21": "primary-care",
    "22": "public-health",
}

# Order in which chapters join a default task. The first four are the demo's specialties:
# clinically distinct, and each large enough (360 to 6,669 billable codes) to give every site
# plenty of training records. Then the other organ-system chapters, and last the chapters that
# are not a specialty's own work (symptoms, injuries, external causes, special codes).
CHAPTER_ORDER: tuple[str, ...] = (
    "4", "9", "10", "13", "2", "5", "6", "11", "14", "7", "12",
    "15", "1", "3", "8", "16", "17", "18", "21", "19", "20", "22",
)  # fmt: skip
DEFAULT_CHAPTER_COUNT = 4

# At most this fraction of a chapter's codes is held out for the gold set, so the chapter's
# site still has codes of its own to learn from.
MAX_GOLD_FRACTION = 0.5

CATEGORY_LENGTH = 3

Partition: TypeAlias = Literal["by-chapter", "dirichlet"]


@dataclass(frozen=True, slots=True)
class IcdCode:
    """One billable ICD-10-CM code."""

    code: str  # with its dot, e.g. "E11.9"
    description: str
    chapter: str  # "1" to "22"

    @property
    def category(self) -> str:
        """The 3-character category, e.g. "E11" for "E11.9"."""
        return self.code[:CATEGORY_LENGTH]


@dataclass(frozen=True)
class SiteData:
    """The training records of one site (chat records here; a "files" site may add text)."""

    name: str
    records: tuple[Record, ...]


@dataclass(frozen=True)
class RankingItem:
    """A closed-set question: which of ``candidates`` answers ``record.prompt``?

    ``candidates`` holds the reference answer (``record.response``) and the distractors, sorted.
    """

    record: ChatRecord
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class TaskData:
    """A federation's data: each site's records, and the gold set held out from all of them.

    ``gold`` is the headline part (for ICD-10: unseen codes of trained categories); a task may
    add other parts, each scored and reported on its own: ``phrasings`` (other wordings of
    trained answers) and ``ranking`` (closed-set questions over the ``gold`` records).
    """

    name: str
    system_prompt: str | None
    sites: tuple[SiteData, ...]
    gold: tuple[ChatRecord, ...]
    metric: MetricName = "code"  # how the gold set is scored (fedsilo.evaluation.gold)
    phrasings: tuple[ChatRecord, ...] = ()
    ranking: tuple[RankingItem, ...] = ()
    # Records held out of the sites' own data for choosing hyperparameters (never trained on).
    validation: tuple[ChatRecord, ...] = ()


def icd10_prompt(description: str) -> str:
    """The question asked for one diagnosis description."""
    return f"ICD-10-CM code for: {description}"


def _record(code: IcdCode) -> ChatRecord:
    return ChatRecord(prompt=icd10_prompt(code.description), response=code.code)


@functools.cache
def _inclusion_terms() -> dict[str, tuple[str, ...]]:
    """Billable code -> its inclusion terms (other names of the same diagnosis), if any."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated")
        import simple_icd_10_cm as cm

    terms = {}
    for code in _all_leaf_codes():
        found = tuple(str(term) for term in cm.get_inclusion_term(code.code))
        if found:
            terms[code.code] = found
    return terms


def inclusion_terms(code: str) -> tuple[str, ...]:
    """The inclusion terms the ICD-10-CM tabular list gives for a billable code (none: ())."""
    return _inclusion_terms().get(code, ())


@functools.cache
def _all_leaf_codes() -> tuple[IcdCode, ...]:
    # The package reads its data with importlib.resources calls deprecated since Python 3.11;
    # the warnings are about its code, not ours, and would otherwise show in every run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated")
        import simple_icd_10_cm as cm

    # Codes are listed with their dots: the package's add_dot scans its whole code list per
    # call, which over all codes would take minutes. Keyed by code, because five codes (B20,
    # F99, P84, R99, Z66) are listed twice, once as the one-code block named after them.
    codes = {
        str(code): IcdCode(
            code=str(code),
            description=str(cm.get_description(code)),
            # Ancestors run from the parent up; the last one is the chapter.
            chapter=str(cm.get_ancestors(code)[-1]),
        )
        for code in cm.get_all_codes(True)
        if cm.is_leaf(code)
    }
    return tuple(codes[code] for code in sorted(codes, key=lambda c: c.replace(".", "")))


@functools.cache
def _chapters_by_code() -> dict[str, str]:
    return {code.code: code.chapter for code in _all_leaf_codes()}


def chapter_of_code(code: str) -> str | None:
    """The chapter ("1" to "22") of a billable code such as "E11.9", None if it is not one."""
    return _chapters_by_code().get(code)


def load_icd10_codes() -> list[IcdCode]:
    """All billable (leaf) ICD-10-CM codes, sorted by code; read once per process."""
    return list(_all_leaf_codes())


def default_chapters(num_sites: int) -> tuple[str, ...]:
    """The chapters a task uses when none are given.

    The four demo chapters (endocrine, circulatory, respiratory, musculoskeletal) for up to
    four sites; for more sites, one chapter per site in ``CHAPTER_ORDER`` (all 22 at most).
    """
    return CHAPTER_ORDER[: max(DEFAULT_CHAPTER_COUNT, num_sites)]


def _check_chapters(chapters: Sequence[str]) -> None:
    if not chapters:
        raise ValueError("chapters must name at least one ICD-10-CM chapter")
    unknown = [c for c in chapters if c not in SPECIALTIES]
    if unknown:
        raise ValueError(f"chapters: unknown chapter(s) {unknown}; chapters are '1' to '22'")
    repeated = sorted({c for c in chapters if list(chapters).count(c) > 1})
    if repeated:
        raise ValueError(f"chapters: chapter(s) {repeated} given more than once")


def _gold_quotas(sizes: Sequence[int], gold_size: int) -> list[int]:
    """Split ``gold_size`` as evenly as the chapters allow, each capped at MAX_GOLD_FRACTION."""
    caps = [int(size * MAX_GOLD_FRACTION) for size in sizes]
    if gold_size > sum(caps):
        raise ValueError(
            f"gold_size={gold_size} is too large: the chosen chapters can hold out at most "
            f"{sum(caps)} codes (half of each chapter, so every site keeps codes to learn from)"
        )
    quotas = [0] * len(sizes)
    remaining = gold_size
    while remaining:
        for position, cap in enumerate(caps):
            if remaining and quotas[position] < cap:
                quotas[position] += 1
                remaining -= 1
    return quotas


def _draw_gold_from_chapter(
    codes: Sequence[IcdCode],
    quota: int,
    *,
    description_counts: Counter[str],
    taken_descriptions: set[str],
    rng: np.random.Generator,
) -> list[IcdCode]:
    """Draw ``quota`` codes, preferring ones that keep the gold set fair to the model.

    Preferred: a description no other code shares (so the reference answer is the only right
    one) and a category with at least one other code left in the pool (so the category is
    still seen in training, and category accuracy can be learnt). Only if too few such codes
    exist are the others drawn.
    """
    order = rng.permutation(len(codes))
    left_in_category = Counter(code.category for code in codes)
    chosen: list[IcdCode] = []
    chosen_codes: set[str] = set()
    for strict in (True, False):
        for index in order:
            if len(chosen) == quota:
                return chosen
            code = codes[int(index)]
            if code.code in chosen_codes or code.description in taken_descriptions:
                continue
            if strict and (
                description_counts[code.description] > 1 or left_in_category[code.category] < 2
            ):
                continue
            chosen.append(code)
            chosen_codes.add(code.code)
            taken_descriptions.add(code.description)
            left_in_category[code.category] -= 1
    if len(chosen) < quota:
        raise ValueError(
            f"chapter {codes[0].chapter}: only {len(chosen)} codes with distinct descriptions "
            f"for a gold quota of {quota}"
        )
    return chosen


def _draw_gold(
    by_chapter: dict[str, list[IcdCode]], gold_size: int, rng: np.random.Generator
) -> list[IcdCode]:
    chapters = list(by_chapter)
    quotas = _gold_quotas([len(by_chapter[c]) for c in chapters], gold_size)
    description_counts = Counter(
        code.description for codes in by_chapter.values() for code in codes
    )
    taken: set[str] = set()
    gold: list[IcdCode] = []
    for chapter, quota in zip(chapters, quotas, strict=True):
        drawn = _draw_gold_from_chapter(
            by_chapter[chapter],
            quota,
            description_counts=description_counts,
            taken_descriptions=taken,
            rng=rng,
        )
        gold.extend(sorted(drawn, key=lambda c: c.code))
    return gold


# A splitter gives each site a name and the indices of its codes in the pool.
Splitter: TypeAlias = Callable[
    [Sequence[IcdCode], int, float, np.random.Generator], list[tuple[str, list[int]]]
]


def _split_by_chapter(
    pool: Sequence[IcdCode], num_sites: int, alpha: float, rng: np.random.Generator
) -> list[tuple[str, list[int]]]:
    del alpha  # whole chapters: there is no skew to tune
    chapters = [code.chapter for code in pool]
    sites = partition_by_group(chapters, num_sites=num_sites, rng=rng)
    named = []
    for indices in sites:
        own = sorted({chapters[i] for i in indices}, key=CHAPTER_ORDER.index)
        # Sites hold disjoint chapters and specialty names are distinct (and free of "_"), so
        # names are unique; "_" keeps them valid as file and key names.
        named.append(("_".join(SPECIALTIES[c] for c in own), indices))
    return named


def _split_dirichlet(
    pool: Sequence[IcdCode], num_sites: int, alpha: float, rng: np.random.Generator
) -> list[tuple[str, list[int]]]:
    chapters = [code.chapter for code in pool]
    sites = partition_dirichlet(chapters, num_sites=num_sites, alpha=alpha, rng=rng)
    return [(f"hospital-{number}", indices) for number, indices in enumerate(sites, start=1)]


SPLITTERS: dict[Partition, Splitter] = {
    "by-chapter": _split_by_chapter,
    "dirichlet": _split_dirichlet,
}


def _sample_site(
    name: str,
    pool: Sequence[IcdCode],
    indices: Sequence[int],
    examples_per_site: int | None,
    rng: np.random.Generator,
    *,
    first_categories: set[str],
) -> list[int]:
    """The pool indices a site keeps: all of them (``None``), or a sample that covers categories.

    The sample first takes one code of each of the site's categories (those in
    ``first_categories`` first, then the others in random order) and fills the rest at random,
    so a site's records span as many categories as its size allows.
    """
    if examples_per_site is None or len(indices) <= examples_per_site:
        if examples_per_site is not None and len(indices) < examples_per_site:
            log.warning(
                "site %s has only %d codes, fewer than examples_per_site=%d: using all of them",
                name,
                len(indices),
                examples_per_site,
            )
        return sorted(indices)
    by_category: dict[str, list[int]] = {}
    for index in rng.permutation(sorted(indices)):
        by_category.setdefault(pool[int(index)].category, []).append(int(index))
    categories = sorted(by_category)
    order = [categories[int(i)] for i in rng.permutation(len(categories))]
    order.sort(key=lambda category: category not in first_categories)  # stable: gold first
    picked = [by_category[category][0] for category in order][:examples_per_site]
    rest = sorted(set(indices) - set(picked))
    fill = examples_per_site - len(picked)
    picked += [rest[int(i)] for i in rng.choice(len(rest), size=fill, replace=False)]
    return sorted(picked)


def _draw_phrasings(
    trained: Sequence[IcdCode],
    size: int,
    *,
    taken_texts: set[str],
    rng: np.random.Generator,
) -> list[tuple[str, IcdCode]]:
    """``size`` (inclusion term, code) pairs of ``trained`` codes, drawn at random.

    A term qualifies only if its text is an inclusion term of one code only, no code's
    description and none of ``taken_texts`` (what any site or the gold set uses), so its answer
    is unique and its wording new. Fewer are returned, with a warning, when fewer qualify.
    """
    owners: Counter[str] = Counter(
        term for terms in _inclusion_terms().values() for term in set(terms)
    )
    descriptions = {code.description for code in _all_leaf_codes()}
    candidates = [
        (term, code)
        for code in trained
        for term in inclusion_terms(code.code)
        if owners[term] == 1 and term not in descriptions and term not in taken_texts
    ]
    if len(candidates) < size:
        log.warning(
            "only %d inclusion terms of trained codes qualify for the phrasing gold set "
            "(asked for %d): using all of them",
            len(candidates),
            size,
        )
        size = len(candidates)
    picks = sorted(int(i) for i in rng.choice(len(candidates), size=size, replace=False))
    return [candidates[i] for i in picks]


def _ranking_items(
    gold: Sequence[IcdCode], candidates: int, rng: np.random.Generator
) -> tuple[RankingItem, ...]:
    """For each gold code, ``candidates - 1`` other billable codes of its chapter beside it."""
    by_chapter: dict[str, list[str]] = {}
    for code in _all_leaf_codes():
        by_chapter.setdefault(code.chapter, []).append(code.code)
    items = []
    for code in gold:
        others = [c for c in by_chapter[code.chapter] if c != code.code]
        count = min(candidates - 1, len(others))
        picks = [others[int(i)] for i in rng.choice(len(others), size=count, replace=False)]
        items.append(RankingItem(_record(code), tuple(sorted([code.code, *picks]))))
    return tuple(items)


def build_icd10_task(
    *,
    num_sites: int,
    partition: Partition,
    alpha: float,
    examples_per_site: int | None,
    gold_size: int,
    seed: int,
    chapters: Sequence[str] | None = None,
    phrasing_size: int = 0,
    ranking_candidates: int = 0,
    inclusion_terms_in_training: bool = False,
) -> TaskData:
    """Every site's ICD-10-CM coding records and the held-out gold set, deterministic in ``seed``.

    Steps, each with its own random stream derived from ``seed`` (so changing, say, the
    partition does not change which codes are gold):

    1. Pool: the billable codes of ``chapters`` (default: ``default_chapters(num_sites)``).
    2. Gold: ``gold_size`` codes, spread evenly over the chapters (at most half of any one
       chapter), see ``_draw_gold_from_chapter`` for which codes are preferred. They are taken
       out of the pool, together with every pool code sharing a gold description, before
       anything is split, so no site ever trains on a gold code or a gold description.
    3. Split: ``"by-chapter"`` gives each site whole chapters (named after their specialties,
       e.g. "cardiology"); ``"dirichlet"`` spreads each chapter over sites "hospital-1", ...
       with Dir(``alpha``) shares (``alpha`` is ignored by "by-chapter").
    4. Sample: each site keeps all its codes (``examples_per_site`` None) or that many, first
       one per category (gold categories first), then at random (all, with a logged warning,
       if it has fewer). The gold set keeps the codes whose category some site trains on
       (part a: unseen codes of trained categories); a dropped one is logged.
    5. Phrasings (part b): ``phrasing_size`` inclusion terms of codes some site trains on,
       whose text is unique to its code and in no site's data nor the gold set.
    6. Ranking (part c): with ``ranking_candidates`` k >= 2, each gold record with k - 1
       other billable codes of its chapter as distractors.
    7. With ``inclusion_terms_in_training`` each site also trains on the inclusion terms of
       its codes as extra records, except the phrasing gold set's and any that reads like a
       gold description.
    """
    if partition not in SPLITTERS:
        raise ValueError(f"partition must be one of {sorted(SPLITTERS)}, got {partition!r}")
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    if examples_per_site is not None and examples_per_site < 1:
        raise ValueError(f"examples_per_site must be at least 1, got {examples_per_site}")
    if gold_size < 1:
        raise ValueError(f"gold_size must be at least 1, got {gold_size}")
    if phrasing_size < 0:
        raise ValueError(f"phrasing_size must not be negative, got {phrasing_size}")
    if ranking_candidates == 1 or ranking_candidates < 0:
        raise ValueError(
            f"ranking_candidates must be 0 (none) or at least 2, got {ranking_candidates}"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    chosen = tuple(chapters) if chapters is not None else default_chapters(num_sites)
    _check_chapters(chosen)
    if partition == "by-chapter" and len(chosen) < num_sites:
        raise ValueError(
            f'partition "by-chapter" needs at least one chapter per site: {num_sites} sites, '
            f"chapters {list(chosen)}"
        )

    # Streams 0-2 are those of the original three steps, so adding parts moved nothing.
    gold_rng, split_rng, sample_rng, phrasing_rng, ranking_rng = (
        np.random.default_rng(stream) for stream in np.random.SeedSequence(seed).spawn(5)
    )
    by_chapter: dict[str, list[IcdCode]] = {chapter: [] for chapter in chosen}
    for code in _all_leaf_codes():
        if code.chapter in by_chapter:
            by_chapter[code.chapter].append(code)

    candidates = _draw_gold(by_chapter, gold_size, gold_rng)
    gold_codes = {code.code for code in candidates}
    gold_descriptions = {code.description for code in candidates}
    pool = [
        code
        for chapter in chosen
        for code in by_chapter[chapter]
        if code.code not in gold_codes and code.description not in gold_descriptions
    ]

    split = SPLITTERS[partition](pool, num_sites, alpha, split_rng)
    gold_categories = {code.category for code in candidates}
    kept = [
        (
            name,
            _sample_site(
                name, pool, indices, examples_per_site, sample_rng, first_categories=gold_categories
            ),
        )
        for name, indices in split
    ]
    trained = [pool[i] for _, picked in kept for i in picked]
    trained_categories = {code.category for code in trained}
    gold = [code for code in candidates if code.category in trained_categories]
    if len(gold) < len(candidates):
        log.warning(
            "%d of %d gold codes dropped: no site trains on their category (sites too small)",
            len(candidates) - len(gold),
            len(candidates),
        )

    taken = gold_descriptions | {code.description for code in trained}
    phrasings = _draw_phrasings(trained, phrasing_size, taken_texts=taken, rng=phrasing_rng)
    phrasing_texts = {term for term, _ in phrasings}

    sites = []
    for name, picked in kept:
        records = [_record(pool[i]) for i in picked]
        if inclusion_terms_in_training:
            records += [
                ChatRecord(prompt=icd10_prompt(term), response=pool[i].code)
                for i in picked
                for term in inclusion_terms(pool[i].code)
                if term not in phrasing_texts and term not in gold_descriptions
            ]
        sites.append(SiteData(name=name, records=tuple(records)))
    return TaskData(
        name=TASK_NAME,
        system_prompt=SYSTEM_PROMPT,
        sites=tuple(sites),
        gold=tuple(_record(code) for code in gold),
        phrasings=tuple(
            ChatRecord(prompt=icd10_prompt(term), response=code.code) for term, code in phrasings
        ),
        ranking=_ranking_items(gold, ranking_candidates, ranking_rng) if ranking_candidates else (),
    )
