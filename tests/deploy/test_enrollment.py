"""The coordinator's enrollment check: each enrolled site holds keys of its own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fedsilo.config import ConfigError, FedsiloConfig
from fedsilo.crypto import generate_private_key, public_key_text
from fedsilo.crypto.certs import init_node_keys
from fedsilo.deploy.coordinator import check_enrollment


def _site(tmp_path: Path, name: str) -> dict[str, str]:
    _, node_public = init_node_keys(name, tmp_path / name)
    return {
        "name": name,
        "public_key": public_key_text(generate_private_key().public_key()),
        "node_public_key": node_public.read_text(encoding="ascii").strip(),
    }


@pytest.mark.parametrize("shared", ["public_key", "node_public_key"])
def test_two_sites_enrolling_the_same_key_are_refused(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path, shared: str
) -> None:
    sites = [_site(tmp_path, name) for name in ("alpha", "beta", "gamma")]
    assert set(
        check_enrollment(
            make_config(federation={"sites": sites, "keys_dir": str(tmp_path / "keys")})
        )
    ) == {
        "alpha",
        "beta",
        "gamma",
    }
    sites[2] = {**sites[2], shared: sites[0][shared]}

    with pytest.raises(ConfigError, match=f"sites alpha and gamma enroll the same {shared}"):
        check_enrollment(
            make_config(federation={"sites": sites, "keys_dir": str(tmp_path / "keys")})
        )
