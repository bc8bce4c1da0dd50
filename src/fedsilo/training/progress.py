"""Where a site's training progress goes while a round runs.

The loop reports every step (:class:`fedsilo.training.loop.StepProgress`); the site passes it
on with its name to the process's sink. By default the sink logs a line at the first step,
about every tenth of the round and the last step (a deployed site's worker log); a terminal
front end (``fedsilo demo``, ``fedsilo simulate``) swaps in a live progress bar for the
duration of a run. Only step counts, token counts and times pass through: nothing about a
record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fedsilo.training.loop import StepProgress

log = logging.getLogger("fedsilo.training")

ProgressSink = Callable[[str, StepProgress], None]


def progress_lines(say: Callable[[str], None]) -> ProgressSink:
    """A sink that says a line at the first step, about every tenth of the round and the last."""

    def sink(site: str, progress: StepProgress) -> None:
        every = max(1, progress.steps // 10)
        if progress.step in (1, progress.steps) or progress.step % every == 0:
            say(
                f"site {site}: training step {progress.step}/{progress.steps}, "
                f"{progress.tokens_per_second:,.0f} tokens/s"
            )

    return sink


log_progress = progress_lines(log.info)
"""The default sink: the lines go to the ``fedsilo.training`` log."""

_sink: ProgressSink = log_progress


def report_progress(site: str, progress: StepProgress) -> None:
    """Pass one step of ``site``'s local training to the current sink."""
    _sink(site, progress)


def site_progress(site: str) -> Callable[[StepProgress], None]:
    """The loop's ``on_step`` callback for ``site``."""

    def on_step(progress: StepProgress) -> None:
        report_progress(site, progress)

    return on_step


@contextmanager
def progress_to(sink: ProgressSink) -> Iterator[None]:
    """Send training progress to ``sink`` while the body runs (then to the previous sink)."""
    global _sink
    previous, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = previous
