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
class TaskData:
    """A federation's data: each site's records, and the gold set held out from all of them."""

    name: str
    system_prompt: str | None
    sites: tuple[SiteData, ...]
    gold: tuple[ChatRecord, ...]
    metric: MetricName = "code"  # how the gold set is scored (fedsilo.evaluation.gold)


def icd10_prompt(description: str) -> str:
    """The question asked for one diagnosis description."""
    return f"ICD-10-CM code for: {description}"


def _record(code: IcdCode) -> ChatRecord:
    return ChatRecord(prompt=icd10_prompt(code.description), response=code.code)


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
    examples_per_site: int,
    rng: np.random.Generator,
) -> SiteData:
    if len(indices) <= examples_per_site:
        if len(indices) < examples_per_site:
            log.warning(
                "site %s has only %d codes, fewer than examples_per_site=%d: using all of them",
                name,
                len(indices),
                examples_per_site,
            )
        picked = list(indices)
    else:
        picked = sorted(int(i) for i in rng.choice(indices, size=examples_per_site, replace=False))
    return SiteData(name=name, records=tuple(_record(pool[i]) for i in picked))


def build_icd10_task(
    *,
    num_sites: int,
    partition: Partition,
    alpha: float,
    examples_per_site: int,
    gold_size: int,
    seed: int,
    chapters: Sequence[str] | None = None,
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
    4. Sample: each site keeps ``examples_per_site`` of its codes at random (all of them, with
       a logged warning, if it has fewer).
    """
    if partition not in SPLITTERS:
        raise ValueError(f"partition must be one of {sorted(SPLITTERS)}, got {partition!r}")
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    if examples_per_site < 1:
        raise ValueError(f"examples_per_site must be at least 1, got {examples_per_site}")
    if gold_size < 1:
        raise ValueError(f"gold_size must be at least 1, got {gold_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    chosen = tuple(chapters) if chapters is not None else default_chapters(num_sites)
    _check_chapters(chosen)
    if partition == "by-chapter" and len(chosen) < num_sites:
        raise ValueError(
            f'partition "by-chapter" needs at least one chapter per site: {num_sites} sites, '
            f"chapters {list(chosen)}"
        )

    gold_rng, split_rng, sample_rng = (
        np.random.default_rng(stream) for stream in np.random.SeedSequence(seed).spawn(3)
    )
    by_chapter: dict[str, list[IcdCode]] = {chapter: [] for chapter in chosen}
    for code in _all_leaf_codes():
        if code.chapter in by_chapter:
            by_chapter[code.chapter].append(code)

    gold = _draw_gold(by_chapter, gold_size, gold_rng)
    gold_codes = {code.code for code in gold}
    gold_descriptions = {code.description for code in gold}
    pool = [
        code
        for chapter in chosen
        for code in by_chapter[chapter]
        if code.code not in gold_codes and code.description not in gold_descriptions
    ]

    split = SPLITTERS[partition](pool, num_sites, alpha, split_rng)
    sites = tuple(
        _sample_site(name, pool, indices, examples_per_site, sample_rng) for name, indices in split
    )
    return TaskData(
        name=TASK_NAME,
        system_prompt=SYSTEM_PROMPT,
        sites=sites,
        gold=tuple(_record(code) for code in gold),
    )
