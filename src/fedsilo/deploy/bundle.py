"""The app bundle (FAB) the coordinator submits to its SuperLink, and its hash.

Flower ships a run's app to every SuperNode as a FAB, and offline there is no way to pin it
(``--trusted-entities`` needs Flower Hub). fedsilo never executes a bundle: the coordinator
runs its installed ServerApp itself, and each site runs its installed ClientApp in its own
worker. The bundle is a fixed, tiny manifest built from the bytes below, so its sha256 is the
same on every machine for a given fedsilo version; a site may pin it (``[code] bundles`` in its
policy) to refuse runs that were submitted with anything else.
"""

from __future__ import annotations

import hashlib

from flwr.cli.build import build_fab_from_files

import fedsilo

_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedsilo-federation"
version = "{version}"
description = "fedsilo federation manifest: sites run their installed fedsilo, never a bundle"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedsilo"

[tool.flwr.app.components]
serverapp = "fedsilo.deploy.coordinator:not_loaded_from_bundle"
clientapp = "fedsilo.deploy.site:not_loaded_from_bundle"

[tool.flwr.app.config]
"""
_README = b"This bundle carries no code. fedsilo sites run the fedsilo they installed.\n"


def build_bundle() -> bytes:
    """The FAB bytes for this fedsilo version (deterministic)."""
    files = {
        "pyproject.toml": _PYPROJECT.format(version=fedsilo.__version__).encode("utf-8"),
        "README.md": _README,
    }
    return build_fab_from_files(files)[0]


def bundle_hash(content: bytes) -> str:
    """``sha256:<hex>``, the form a site policy pins."""
    return "sha256:" + hashlib.sha256(content).hexdigest()


def expected_bundle_hash() -> str:
    """The hash of the bundle this installed fedsilo submits."""
    return bundle_hash(build_bundle())
