"""What a site (or anyone reaching the coordinator's public port) can and cannot do.

A real SuperLink (TLS, SuperNode authentication) and a real nginx in front of it, as
`fedsilo coordinator start` runs them. The same Control API requests that work on the
SuperLink's loopback port must be refused through the proxy, so this test fails if the
proxy forwards them.
"""

from __future__ import annotations

import datetime
import json
import ssl
from pathlib import Path

import httpx
import pytest
from flwr.proto.control_pb2 import RegisterNodeRequest

from fedsilo.cli.main import main
from fedsilo.crypto.certs import (
    init_coordinator_tls,
    init_node_keys,
    issue_server_cert,
    node_public_key_pem,
    parse_node_public_key,
    read_certificate,
    read_ec_private_key,
    read_node_private_key,
    write_server_cert,
)
from fedsilo.deploy.bundle import build_bundle
from fedsilo.deploy.control import Control
from fedsilo.deploy.coordinator import CoordinatorService
from fedsilo.deploy.nginx import ProxySettings, nginx_binary, start_proxy
from fedsilo.deploy.processes import Children, free_port, wait_for_port

from .harness import SITES, Deployment, wait_for, write_passphrase, write_site_policy

try:
    nginx_binary()
except RuntimeError:  # pragma: no cover - CI installs it (.ci/run)
    pytest.skip("nginx is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def coordinator(
    coordinator_front: tuple[CoordinatorService, Deployment],
) -> tuple[CoordinatorService, Path, str]:
    service, deployment = coordinator_front
    ca = deployment.root / "coordinator" / "certs" / "ca.pem"
    return service, ca, f"127.0.0.1:{deployment.listen_port}"


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
        enrolled = direct.nodes()  # on loopback the Control API works
        assert sorted(n.name for n in enrolled) == sorted(SITES)
        with pytest.raises(httpx.HTTPStatusError) as submitted:
            through_proxy.start_run(build_bundle())
        assert submitted.value.response.status_code == 404
        with pytest.raises(httpx.HTTPStatusError) as registered:
            through_proxy._client.RegisterNode(
                RegisterNodeRequest(public_key=_intruder_key(tmp_path), name="intruder")
            )
        assert registered.value.response.status_code == 404
        assert direct.nodes() == enrolled  # nothing was registered
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
    response = _post_empty(coordinator, path)

    assert response.status_code in (400, 404), (path, response.status_code)
    assert response.headers.get("server") == "nginx"  # answered by nginx, not Flower


@pytest.mark.parametrize("suffix", ["%0A", "%0D%0A", "%0Ax"])
def test_a_fleet_route_followed_by_a_newline_never_reaches_flower(
    coordinator: tuple[CoordinatorService, Path, str], suffix: str
) -> None:
    # A regex ending in $ matches before a final newline: nginx passed get-run%0A on, with a raw
    # newline in the request line (Flower's server then answered 400). nginx's own 404 only.
    response = _post_empty(coordinator, f"/v1/fleet/get-run{suffix}")

    assert response.status_code == 404, response.text


def _post_empty(coordinator: tuple[CoordinatorService, Path, str], path: str) -> httpx.Response:
    """An empty POST to ``path`` on the coordinator's public address, trusting its CA."""
    _service, ca, public = coordinator
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as client:
        return client.post(f"https://{public}{path}", content=b"")


def test_the_fleet_api_reaches_flower_and_demands_node_auth(
    coordinator: tuple[CoordinatorService, Path, str],
) -> None:
    _service, ca, public = coordinator
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as client:
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


# --- sites the coordinator or the site itself must refuse (real site processes, 10-20 s) -


def _site_with_material(deployment: Deployment, name: str, *, ca: Path, address: str) -> Path:
    """A site folder with its own keys (not enrolled) and a policy pointing at ``address``."""
    site_dir = deployment.root / name
    keys = site_dir / "keys"
    secret = write_passphrase(site_dir)
    command = ["certs", "site", "--name", name, "--out", str(keys), "--ca", str(ca)]
    assert main([*command, "--passphrase-file", str(secret)]) == 0
    signing = deployment.root / "coordinator" / "certs" / "coordinator-signing.pub"
    (keys / "coordinator-signing.pub").write_bytes(signing.read_bytes())
    (site_dir / "records.jsonl").write_text('{"prompt": "Fever", "response": "R50.9"}\n')
    port = int(address.rsplit(":", 1)[1])
    policy = write_site_policy(site_dir, name, listen_port=port)
    policy.write_text(
        policy.read_text().replace('"MODEL"', json.dumps(str(deployment.tiny_model_dir)))
    )
    return policy


def _run_site(deployment: Deployment, policy: Path, *, timeout: float = 120) -> tuple[int, str]:
    started = deployment._spawn(policy.parent.name, ["site", "start", str(policy)])
    try:
        code = started.process.wait(timeout=timeout)
    finally:
        deployment.stop(started)
    return code, started.log()


def test_an_enrolled_site_joins(coordinator_front: tuple[CoordinatorService, Deployment]) -> None:
    service, deployment = coordinator_front
    site = deployment.start_site("alpha")
    control = Control(service.superlink_address, ca_cert=service.files.ca_cert)
    try:
        wait_for(
            lambda: any(n.name == "alpha" and n.status == "online" for n in control.nodes()),
            timeout=120,
            what="alpha to come online",
            watch=[site],
        )
    finally:
        control.close()
        deployment.stop(site)


def test_a_site_that_is_not_enrolled_is_refused(
    coordinator_front: tuple[CoordinatorService, Deployment],
) -> None:
    service, deployment = coordinator_front
    public = f"127.0.0.1:{deployment.listen_port}"
    policy = _site_with_material(deployment, "mallory", ca=service.files.ca_cert, address=public)

    code, log = _run_site(deployment, policy)

    assert code == 2, log
    assert "refused this site's node key" in log


def test_a_coordinator_certificate_from_another_ca_is_refused(
    coordinator_front: tuple[CoordinatorService, Deployment],
) -> None:
    _service, deployment = coordinator_front
    other = init_coordinator_tls(deployment.root / "other-ca", sans=("127.0.0.1",), valid_days=9)
    public = f"127.0.0.1:{deployment.listen_port}"
    policy = _site_with_material(deployment, "wrong-ca", ca=other.ca_cert, address=public)

    code, log = _run_site(deployment, policy)

    assert code == 2, log
    assert "does not verify" in log and "self-signed certificate in certificate chain" in log
    assert "SuperNode pid" not in log  # nothing was started towards that peer


def test_an_expired_coordinator_certificate_is_refused(
    coordinator_front: tuple[CoordinatorService, Deployment],
) -> None:
    service, deployment = coordinator_front
    certs = deployment.root / "coordinator" / "certs"
    ca_key, ca_cert = read_ec_private_key(certs / "ca.key"), read_certificate(certs / "ca.pem")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    key, cert = issue_server_cert(
        ca_key, ca_cert, common_name="expired", sans=("127.0.0.1",), valid_days=1, not_before=past
    )
    expired = deployment.root / "expired"
    expired.mkdir()
    write_server_cert(
        key, cert, ca_cert, cert_path=expired / "server.pem", key_path=expired / "server.key"
    )
    port = free_port()
    proxy = Children()
    settings = ProxySettings(
        listen_host="127.0.0.1",
        listen_port=port,
        upstream_port=service.superlink_port,
        server_cert=expired / "server.pem",
        server_key=expired / "server.key",
        ca_cert=certs / "ca.pem",
        max_body_bytes=1 << 20,
        state_dir=expired,
    )
    try:
        start_proxy(proxy, settings)
        wait_for_port("127.0.0.1", port, timeout=30, children=proxy)
        policy = _site_with_material(
            deployment, "late", ca=certs / "ca.pem", address=f"127.0.0.1:{port}"
        )
        # Enrolled, so that only the certificate can be the reason.
        control = Control(service.superlink_address, ca_cert=certs / "ca.pem")
        try:
            node_pub = (deployment.root / "late" / "keys" / "late.node.pub").read_text()
            pem = node_public_key_pem(parse_node_public_key(node_pub, source="late"))
            control.register_node(public_key_pem=pem, name="late")
        finally:
            control.close()

        code, log = _run_site(deployment, policy)
    finally:
        proxy.stop_all()

    assert code == 2, log
    assert "certificate has expired" in log
