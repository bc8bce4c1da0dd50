"""Text meant for a reader (a report, a model card): one line, no traceback, no local paths.

Rejection reasons and failure messages may carry a Python traceback or the coordinator's
install paths (a site's exception relayed by Flower, say). Those details belong in the
coordinator's log; what an auditor reads is the reason itself, on one line.
"""

from __future__ import annotations

import re

MAX_CHARS = 300
# What every epsilon composed from the ledger leaves out, said wherever one is shown (the
# report, the model card, ``fedsilo privacy``): the ledger holds accepted updates only.
EPSILON_OF_ACCEPTED_UPDATES_ONLY = (
    "A site's \u03b5 here composes its accepted updates only: an update it released that was "
    "rejected or arrived too late is not counted, so the site's own `privacy-spent.json` is "
    "authoritative and may show more."
)
# Ray and Flower wrap an exception as "<class 'pkg.Error'>:<'message'>".
_WRAPPED = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", re.DOTALL)
# Characters a terminal or a text viewer acts on instead of showing: C0 and C1 controls (escape
# sequences, carriage return, NUL) and the bidirectional overrides and isolates that reorder
# what a reader sees. Site-sent text may carry them; a reader-facing line shows U+FFFD instead.
_UNSHOWABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# An absolute POSIX path of two or more parts, or a Windows drive path.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:/[^\s/'\"():,;]+){2,}/?|[A-Za-z]:\\[^\s'\"]+")


def _without_paths(text: str, replacements: dict[str, str]) -> str:
    for prefix, label in sorted(replacements.items(), key=lambda item: -len(item[0])):
        if prefix:
            text = text.replace(prefix, label)
    return _ABSOLUTE_PATH.sub(lambda match: _basename(match.group(0)), text)


def _basename(path: str) -> str:
    name = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
    return f"\u2026/{name}"


def one_line(text: str, *, replacements: dict[str, str] | None = None) -> str:
    """``text`` as one reader-facing line.

    The traceback (everything from "Traceback" on, and frame lines) is dropped, Flower's
    ``<class '...'>:<'...'>`` wrapping is unwrapped, ``replacements`` (say, the run folder's
    absolute path -> "RUN") are applied, any other absolute path is cut to its last part, and
    control characters and bidirectional overrides become U+FFFD. The result is at most
    ``MAX_CHARS`` characters.
    """
    text = _UNSHOWABLE.sub("\ufffd", text.strip())
    wrapped = _WRAPPED.match(text)
    if wrapped:
        text = f"{wrapped.group(1)}: {wrapped.group(2)}"
    kept: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Traceback (most recent call last)"):
            break
        if line.startswith('File "') or not line:
            continue
        kept.append(line)
    line = " ".join(kept) or "no reason given"
    line = _without_paths(line, replacements or {})
    return line if len(line) <= MAX_CHARS else line[: MAX_CHARS - 1] + "\u2026"
