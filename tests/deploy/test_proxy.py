"""What a site (or anyone reaching the coordinator's public port) can and cannot do.

A real SuperLink (TLS, SuperNode authentication) and a real nginx in front of it, as
`fedsilo coordinator start` runs them. The same Control API requests that work on the
SuperLink's loopback port must be refused through the proxy, so this test fails if the
proxy forwards them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from flwr.proto.control_pb2 import RegisterNodeRequest

from fedsilo.config import load_config
from fedsilo.crypto.certs import init_node_keys, node_public_key_pem, read_node_private_key
from fedsilo.deploy.bundle import build_bundle
from fedsilo.deploy.control import Control
from fedsilo.deploy.coordinator import CoordinatorService
from fedsilo.deploy.nginx import nginx_binary

from .harness import build_deployment

try:
    nginx_binary()
except RuntimeError:  # pragma: no cover - CI installs it (.ci/run)
    pytest.skip("nginx is not installed", allow_module_level=True)


class _Quiet:
    def round_done(self, record: dict[str, object], *, total_rounds: int) -> None:
        pass

    def notice(self, text: str) -> None:
        pass


@pytest.fixture(scope="module")
def coordinator(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[CoordinatorService, Path, str]]:
    root = tmp_path_factory.mktemp("proxy")
    deployment = build_deployment(root, tiny_model_dir)
    service = CoordinatorService(
        load_config(deployment.config_path), resume=False, reporter=_Quiet(), say=print
    )
    service.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        service.start_superlink()
        service.start_proxy()
        ca = root / "coordinator" / "certs" / "ca.pem"
        yield service, ca, f"127.0.0.1:{deployment.listen_port}"
    finally:
        service.shutdown()  # the SuperLink and nginx, each by its PID


def _intruder_key(tmp_path: Path) -> bytes:
    private, _ = init_node_keys("intruder", tmp_path)
    return node_public_key_pem(read_node_private_key(private).public_key())


def test_the_control_api_answers_on_loopback_only(
    coordinator: tuple[CoordinatorService, Path, str], tmp_path: Path
) -> None:
    service, ca, public = coordinator
    direct = Control(service.superlink_address, ca_cert=ca)
    through_proxy = Control(public, ca_cert=ca)
    try:
        assert direct.nodes() == []  # on loopback the Control API works
        with pytest.raises(httpx.HTTPStatusError) as submitted:
            through_proxy.start_run(build_bundle())
        assert submitted.value.response.status_code == 404
        with pytest.raises(httpx.HTTPStatusError) as registered:
            through_proxy._client.RegisterNode(
                RegisterNodeRequest(public_key=_intruder_key(tmp_path), name="intruder")
            )
        assert registered.value.response.status_code == 404
        assert direct.nodes() == []  # nothing was registered
    finally:
        direct.close()
        through_proxy.close()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/control/list-runs",
        "/v1/runtime/acquire-task",
        "/v1/runtime/pull-task-input",
        "/v1/fleet/../control/start-run",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet/pull-messages/../../control/register-node",
        "/v1/fleet/pull-messages%2f..%2f..%2fcontrol%2fstart-run",
        "//v1/control/start-run",
        "/v1/fleet/get-run/extra",
        "/docs",
        "/health",
    ],
)
def test_everything_but_the_fleet_api_is_refused_by_nginx(
    coordinator: tuple[CoordinatorService, Path, str], path: str
) -> None:
    _service, ca, public = coordinator
    with httpx.Client(verify=str(ca)) as client:
        response = client.post(f"https://{public}{path}", content=b"")

    assert response.status_code in (400, 404), (path, response.status_code)
    assert response.headers.get("server") == "nginx"  # answered by nginx, not Flower


def test_the_fleet_api_reaches_flower_and_demands_node_auth(
    coordinator: tuple[CoordinatorService, Path, str],
) -> None:
    _service, ca, public = coordinator
    with httpx.Client(verify=str(ca)) as client:
        response = client.post(
            f"https://{public}/v1/fleet/get-run",
            content=b"",
            headers={"content-type": "application/protobuf"},
        )
        get = client.get(f"https://{public}/v1/fleet/get-run")

    assert response.status_code == 401  # Flower's SuperNode authentication answered
    assert get.status_code == 403  # only POST is forwarded


def test_the_proxy_presents_the_federation_certificate_only(
    coordinator: tuple[CoordinatorService, Path, str], tmp_path: Path
) -> None:
    _service, _ca, public = coordinator
    with httpx.Client() as client, pytest.raises(httpx.ConnectError, match="CERTIFICATE"):
        client.post(f"https://{public}/v1/fleet/get-run")  # the system CAs do not trust it
