"""Reasons shown to readers: one line, no traceback, no local paths."""

from fedsilo.report import one_line


def test_traceback_is_dropped_and_the_message_kept() -> None:
    reason = (
        "site error: TaskRefusedError: over the budget of 4.5\n"
        "Traceback (most recent call last):\n"
        '  File "/opt/fedsilo/.venv/lib/python3.11/site-packages/fedsilo/client/app.py", '
        "line 59, in train\n    return handle_train(message)\n"
    )

    assert one_line(reason) == "site error: TaskRefusedError: over the budget of 4.5"


def test_flower_wrapping_is_unwrapped() -> None:
    reason = "<class 'flwr.clientapp.ClientAppException'>:<'refused: min_cohort 5'>"

    assert one_line(reason) == "ClientAppException: refused: min_cohort 5"


def test_local_paths_are_cut_and_the_run_folder_named_run() -> None:
    reason = "checkpoint /srv/runs/pilot/checkpoints/round-001/a.st differs from /home/op/x.bin"

    shown = one_line(reason, replacements={"/srv/runs/pilot": "RUN"})

    assert shown == "checkpoint RUN/checkpoints/round-001/a.st differs from \u2026/x.bin"


def test_long_reasons_are_bounded() -> None:
    assert len(one_line("x" * 5000)) == 300


def test_control_characters_and_bidi_overrides_are_not_passed_on() -> None:
    # A site's reason reaches the terminal and the ledger: no escape sequence, NUL, carriage
    # return or right-to-left override may act on what a reader sees.
    line = one_line("bad\x1b[2J update\r\x00 from \u202esite-b\u2066 \x9b31m")

    assert line == "bad\ufffd[2J update\ufffd\ufffd from \ufffdsite-b\ufffd \ufffd31m"
