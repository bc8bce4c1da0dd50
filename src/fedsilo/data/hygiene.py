"""Data hygiene of a simulated federation: what would make its results look better than they are.

Three findings, each counted (none of them stops a run; each is a warning in the start-up log
and a field of RUN/run.json):

- duplicated records: a record that appears more than once in one site's data (it is trained
  on more often than the others, and a duplicated gold-like record inflates memorisation);
- gold records in a site's data: a site that trains on a gold question and its answer makes
  gold accuracy measure recall, not generalisation (compared on the prompt and the answer);
- one file for two sites (task "files"): the same path, or two paths with identical bytes, so
  two "sites" are one dataset counted twice.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedsilo.config import TaskSection
from fedsilo.data.icd10 import TaskData
from fedsilo.data.records import ChatRecord, Record


@dataclass(frozen=True)
class DataHygiene:
    """Counts of each finding; empty maps and tuple when the data is clean."""

    # site -> records beyond the first copy (3 copies of one record count 2)
    duplicated_records: dict[str, int] = field(default_factory=dict)
    # site -> records that are also in the gold set
    gold_records_in_site: dict[str, int] = field(default_factory=dict)
    # groups of sites whose data is the same file (same path or same bytes)
    shared_files: tuple[tuple[str, ...], ...] = ()

    @property
    def count(self) -> int:
        """The number of findings (one per site per kind, one per shared file)."""
        return (
            len(self.duplicated_records) + len(self.gold_records_in_site) + len(self.shared_files)
        )

    def warnings(self) -> list[str]:
        """One line per finding, naming the sites and the counts."""
        lines = [
            f"data hygiene: site {site} holds {count} duplicated record(s)"
            for site, count in sorted(self.duplicated_records.items())
        ]
        lines += [
            f"data hygiene: site {site} holds {count} record(s) of the gold set; gold accuracy "
            "then measures recall of them"
            for site, count in sorted(self.gold_records_in_site.items())
        ]
        lines += [
            f"data hygiene: sites {', '.join(sites)} read the same data file"
            for sites in self.shared_files
        ]
        return lines

    def to_json(self) -> dict[str, object]:
        """The findings as run.json records them (``data_hygiene``)."""
        return {
            "findings": self.count,
            "duplicated_records": dict(sorted(self.duplicated_records.items())),
            "gold_records_in_site": dict(sorted(self.gold_records_in_site.items())),
            "shared_files": [list(sites) for sites in self.shared_files],
        }


def _gold_key(record: Record) -> tuple[str, str] | None:
    if isinstance(record, ChatRecord):
        return (record.prompt.strip(), record.response.strip())
    return None


def _file_identity(path: Path) -> str:
    try:
        with Path(path).open("rb") as handle:  # streamed: a site file may be gigabytes
            return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return f"path:{Path(path).resolve()}"


def _shared_files(task: TaskSection) -> tuple[tuple[str, ...], ...]:
    if task.name != "files":
        return ()
    by_identity: dict[str, list[str]] = {}
    for site in task.sites:
        by_identity.setdefault(_file_identity(site.path), []).append(site.name)
    return tuple(tuple(sorted(names)) for names in by_identity.values() if len(names) > 1)


def check_data_hygiene(data: TaskData, task: TaskSection) -> DataHygiene:
    """The hygiene findings of ``data`` (built from ``task``)."""
    gold = {_gold_key(record) for record in data.gold} - {None}
    duplicated: dict[str, int] = {}
    in_gold: dict[str, int] = {}
    for site in data.sites:
        copies = Counter(site.records)
        extra = sum(count - 1 for count in copies.values())
        if extra:
            duplicated[site.name] = extra
        leaked = sum(1 for record in site.records if _gold_key(record) in gold)
        if leaked:
            in_gold[site.name] = leaked
    return DataHygiene(duplicated, in_gold, _shared_files(task))
