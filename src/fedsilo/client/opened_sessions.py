"""The secure-aggregation and HE sessions a site has opened, kept on its own disk.

A session is opened once (see :func:`fedsilo.client.secagg.handle_advertise`). Flower keeps a
node's ``Context`` only for one Flower run, and a coordinator that restarts (``--resume``) or a
SuperNode that restarts starts a new one, under the same fedsilo run id: a list held only there
would forget what the site opened before. So the site also keeps the list in a file of its own,
written (atomically) before it answers, and refuses a session it cannot show it never opened.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedsilo.privacy.secagg.site import SecAggRefusedError
from fedsilo.storage import read_json_value, write_text_atomic


def read_opened(path: Path, *, site: str) -> list[str]:
    """The session keys recorded in ``path`` (none when it does not exist yet).

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
    return value


def record_opened(path: Path, keys: list[str]) -> None:
    """Write ``keys`` as the site's opened sessions (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(keys) + "\n")
