"""The secure-aggregation and HE sessions a site has opened, kept on its own disk.

A session is opened once (see :func:`fedsilo.client.secagg.handle_advertise`). Flower keeps a
node's ``Context`` only for one Flower run, and a coordinator that restarts (``--resume``) or a
SuperNode that restarts starts a new one, under the same fedsilo run id: a list held only there
would forget what the site opened before. So the site also keeps the list in a file of its own,
written (atomically) before it answers, and refuses a session it cannot show it never opened.

The coordinator numbers a round's attempts upwards (a resumed run goes on after the highest it
recorded), so a site keeps only the last attempt it opened of each round and opens only a later
one. The record then grows by one key per round, not per attempt: a coordinator that retries
without end costs the site a rewrite of the same short list, not a longer one each time.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedsilo.privacy.secagg.masking import SessionId
from fedsilo.privacy.secagg.site import SecAggRefusedError
from fedsilo.storage import read_json_value, write_text_atomic


def _round_and_attempt(key: str) -> tuple[str, int] | None:
    """``("fed/run/round", attempt)`` of a session key (see SessionId.key), None if malformed."""
    round_key, _, attempt = key.rpartition("/")
    if not round_key or not (attempt.isascii() and attempt.isdigit()):
        return None
    return round_key, int(attempt)


def last_attempts(keys: list[str]) -> list[str]:
    """``keys`` reduced to the highest attempt of each round, in first-seen round order.

    Raises ValueError naming a key that is not a session key.
    """
    highest: dict[str, int] = {}
    for key in keys:
        parsed = _round_and_attempt(key)
        if parsed is None:
            raise ValueError(f"{key!r} is not a session key (federation/run/round/attempt)")
        round_key, attempt = parsed
        highest[round_key] = max(attempt, highest.get(round_key, 0))
    return [f"{round_key}/{attempt}" for round_key, attempt in highest.items()]


def opened_before(opened: list[str], session: SessionId) -> str | None:
    """The opened session key that rules ``session`` out (the same or a later attempt of its
    round), or None when the site may open it."""
    round_key, _, _ = session.key().rpartition("/")
    for key in opened:
        parsed = _round_and_attempt(key)
        if parsed is not None and parsed[0] == round_key and parsed[1] >= session.attempt:
            return key
    return None


def read_opened(path: Path, *, site: str) -> list[str]:
    """The session keys recorded in ``path`` (none when it does not exist yet), one per round.

    A record that cannot be read refuses the session (SecAggRefusedError naming the file):
    the site could no longer tell a repeat from a first opening.
    """
    try:
        value = read_json_value(path)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        raise SecAggRefusedError(
            f"site {site}: its record of opened sessions cannot be read ({error}); "
            "no session is opened until it is repaired"
        ) from None
    if not isinstance(value, list) or not all(isinstance(key, str) for key in value):
        raise SecAggRefusedError(
            f"site {site}: {path} is not a list of session keys; no session is opened until "
            "it is repaired"
        )
    try:
        return last_attempts(value)
    except ValueError as error:
        raise SecAggRefusedError(
            f"site {site}: {path}: {error}; no session is opened until it is repaired"
        ) from None


def record_opened(path: Path, keys: list[str]) -> None:
    """Write ``keys`` as the site's opened sessions (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(keys) + "\n")
