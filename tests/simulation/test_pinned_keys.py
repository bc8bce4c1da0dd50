"""A federation whose config pins site keys made with `fedsilo keys init`."""

from collections.abc import Callable
from pathlib import Path

import pytest

from fedsilo.cli.main import main
from fedsilo.config import FedsiloConfig
from fedsilo.crypto import KeyFileError
from fedsilo.data.tasks import build_task
from fedsilo.server.audit import verify_run
from fedsilo.server.membership import load_membership

from .conftest import run_with_grid


def _site_names(config: FedsiloConfig) -> list[str]:
    return [site.name for site in build_task(config.task, seed=config.run.seed).sites]


def _enroll(keys_dir: Path, names: list[str]) -> list[dict[str, str]]:
    for name in names:
        assert main(["keys", "init", "--site", name, "--out", str(keys_dir)]) == 0
    return [
        {"name": name, "public_key": (keys_dir / f"{name}.pub").read_text().strip()}
        for name in names
    ]


def test_pinned_site_keys_are_used_and_verify(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    names = _site_names(make_config())
    pins = _enroll(tmp_path / "keys", names)
    config = make_config(
        run={"rounds": 1},
        federation={"id": "pilot", "sites": pins, "keys_dir": str(tmp_path / "keys")},
    )

    run_with_grid(config, tmp_path / "run")

    membership = load_membership(tmp_path / "run" / "federation.json")
    assert dict(membership.site_public_keys) == {p["name"]: p["public_key"] for p in pins}
    assert membership.federation_id == "pilot"
    assert verify_run(tmp_path / "run").ok


def test_private_key_that_does_not_match_its_pin_is_refused(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    names = _site_names(make_config())
    pins = _enroll(tmp_path / "keys", names)
    pins[0], pins[1] = (
        {"name": pins[0]["name"], "public_key": pins[1]["public_key"]},
        {"name": pins[1]["name"], "public_key": pins[0]["public_key"]},
    )
    config = make_config(federation={"sites": pins, "keys_dir": str(tmp_path / "keys")})

    with pytest.raises(KeyFileError, match="does not belong to the public key pinned"):
        run_with_grid(config, tmp_path / "run")


def test_task_site_without_a_pin_is_refused(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    names = _site_names(make_config())
    pins = _enroll(tmp_path / "keys", names[:2])
    config = make_config(federation={"sites": pins, "keys_dir": str(tmp_path / "keys")})

    with pytest.raises(KeyFileError, match=r"not enrolled in \[\[federation.sites\]\]"):
        run_with_grid(config, tmp_path / "run")
