"""A deployed site's secure-aggregation and HE session secrets, held by its worker alone.

The handlers keep a session's state (X25519 private keys, self-mask seed, shares held for
peers, the CKKS secret context) in the node's ``context.state``. In a deployment Flower keeps
that context in the SuperNode and hands it, with each task, to whoever takes the task from the
SuperNode's Runtime API, which has no client authentication: another account on the site
machine could take a task and read the secrets, or hand back a context with a session of its
own making. So the worker lends the secrets to the context for the length of one task and
takes them back before the context returns to the SuperNode; what the SuperNode's context
holds under these keys is discarded unread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import ConfigRecord, Context

from fedsilo.client.he import HE_STATE_KEY
from fedsilo.client.secagg import STATE_KEY as SECAGG_STATE_KEY

SECRET_STATE_KEYS = (SECAGG_STATE_KEY, HE_STATE_KEY)


class SessionSecrets:
    """The secret session records of each Flower run, in this process's memory only."""

    def __init__(self) -> None:
        self._by_run: dict[int, dict[str, ConfigRecord]] = {}

    @contextmanager
    def lent_to(self, context: Context) -> Iterator[None]:
        """``context`` holds this run's secrets (and only those) while the block runs; after
        it, the secrets the block left are kept here and removed from ``context``."""
        # On the RecordDict itself: its config_records view does not see later writes.
        state = context.state
        for key in SECRET_STATE_KEYS:
            if key in state:
                del state[key]
        for key, record in self._by_run.get(context.run_id, {}).items():
            state[key] = record
        try:
            yield
        finally:
            kept: dict[str, ConfigRecord] = {}
            for key in SECRET_STATE_KEYS:
                if key in state:
                    left = state[key]
                    if isinstance(left, ConfigRecord):
                        kept[key] = left
                    del state[key]
            self._by_run[context.run_id] = kept
