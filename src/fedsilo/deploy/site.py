"""`fedsilo site start POLICY`: one site's SuperNode and its long-lived fedsilo worker.

The site connects out to the coordinator only (its firewall needs no inbound rule): the
SuperNode dials the coordinator's nginx over TLS, verified against the federation's CA, and
authenticates with the site's node key. Its Runtime API listens on 127.0.0.1 and is served by
:class:`fedsilo.deploy.site_worker.SiteWorker` in this process, so the model stays loaded and
only the installed fedsilo code runs. If the SuperNode dies after it had joined, it is started
again and the site rejoins; if it dies right after starting (typically: this site is not
enrolled, or the coordinator's certificate is refused) the command stops with its log.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.fleet_pb2 import DeactivateNodeRequest
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from fedsilo.client.app import build_client_app
from fedsilo.client.policy import PolicyError, SitePolicy, load_policy, resolve_policy_paths
from fedsilo.crypto import fingerprint
from fedsilo.crypto.certs import (
    certificate_fingerprint,
    node_key_fingerprint,
    read_ca_certificate,
    read_node_private_key,
)
from fedsilo.deploy.bundle import expected_bundle_hash
from fedsilo.deploy.processes import (
    Child,
    Children,
    ProcessFailedError,
    apply_quiet_environment,
    flower_binary,
    free_port,
    quiet_environment,
    wait_for_port,
)
from fedsilo.deploy.site_model import DeployedSite, load_identity
from fedsilo.deploy.site_worker import SiteWorker

log = logging.getLogger(__name__)

# A SuperNode that dies sooner than this after starting was refused, not interrupted.
REFUSED_WITHIN_S = 15.0
MAX_RESTARTS = 20


class SiteStartError(RuntimeError):
    """The site cannot start or was refused by the coordinator; says why."""


def deactivate_node(
    address: str, *, ca_cert: Path, node_key: ec.EllipticCurvePrivateKey, node_id: int
) -> bool:
    """Tell the SuperLink this site's node is gone, signed with the node key.

    A SuperNode that is killed cannot deactivate itself, and the SuperLink refuses to activate
    a node it still counts as online (until two missed 30 s heartbeats). The site holds the
    node key, so it can say so itself and rejoin at once.
    """
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(node_key, node_key.public_key()),
    ]
    try:
        with FleetHttpClient.from_server_address(
            address, False, str(ca_cert), interceptors=interceptors
        ) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except (httpx.HTTPError, ValueError) as error:
        log.warning("could not deactivate node %d: %s", node_id, error)
        return False
    return True


def _node_id(child: Child) -> int | None:
    """The node id the SuperNode announced in its log, if it got that far."""
    try:
        text = child.log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = re.findall(r"SuperNode ID: (\d+)", text[child.log_offset :])
    return int(found[-1]) if found else None


def probe_coordinator(address: str, *, ca_cert: Path, timeout: float = 5.0) -> bool:
    """True if the coordinator answers TLS with a certificate this site trusts.

    False if it cannot be reached (not up yet, network); raises SiteStartError if it answers
    with a certificate the federation's CA does not vouch for, that has expired, or that is not
    for this address: a site never talks to such a peer.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLCertVerificationError as error:
        raise SiteStartError(
            f"refusing the coordinator at {address}: its TLS certificate does not verify "
            f"against {ca_cert}: {error.verify_message}"
        ) from None
    except (OSError, ssl.SSLError):
        return False


def not_loaded_from_bundle() -> None:  # pragma: no cover - named in the bundle, never called
    raise RuntimeError("fedsilo sites run their installed ClientApp, never one from a bundle")


def load_site_policy(path: Path) -> SitePolicy:
    """Read a deployed site's policy: [site] and [connect] are required."""
    policy = resolve_policy_paths(load_policy(path), base=Path(path).resolve().parent)
    missing = [name for name in ("site", "connect") if getattr(policy, name) is None]
    if missing:
        raise PolicyError(f"{path}: a deployed site needs the sections {missing}")
    return policy


@dataclass(frozen=True)
class SiteRuntime:
    policy: SitePolicy
    node_key: Path
    runtime_port: int
    state_dir: Path


def supernode_argv(runtime: SiteRuntime) -> list[str]:
    connect = runtime.policy.connect
    assert connect is not None
    return [
        flower_binary("flower-supernode"),
        "--superlink",
        connect.coordinator,
        "--root-certificates",
        str(connect.ca_cert),
        "--auth-supernode-private-key",
        str(runtime.node_key),
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime.runtime_port),
    ]


class SiteService:
    """The running site: SuperNode child, worker, restarts, shutdown."""

    def __init__(self, policy: SitePolicy, *, say: Callable[[str], None]) -> None:
        assert policy.site is not None and policy.connect is not None
        self.policy = policy
        self.say = say
        self.children = Children()
        self.stop_event = threading.Event()
        site = policy.site
        self.runtime = SiteRuntime(
            policy=policy,
            node_key=site.keys_dir / f"{site.name}.node.key",
            runtime_port=free_port(),
            state_dir=site.state_dir,
        )
        self.node_key = read_node_private_key(self.runtime.node_key)
        self.ca, _ = read_ca_certificate(policy.connect.ca_cert)
        self.identity = load_identity(policy)
        self.supernode: Child | None = None
        self.joined_as: int | None = None  # node id once the SuperNode has joined
        self.started_at = 0.0
        self.restarts = 0

    def start_supernode(self) -> Child:
        state = self.runtime.state_dir
        env = quiet_environment({"FLWR_HOME": str((state / "flwr").resolve())})
        child = self.children.start(
            "flower-supernode",
            supernode_argv(self.runtime),
            log_path=state / "supernode.log",
            env=env,
        )
        wait_for_port("127.0.0.1", self.runtime.runtime_port, timeout=60, children=self.children)
        self.supernode, self.started_at = child, time.monotonic()
        return child

    def wait_for_coordinator(self) -> None:
        """Block until the coordinator is reachable with a trusted certificate (or stop)."""
        connect = self.policy.connect
        assert connect is not None
        told = False
        while not self.stop_event.is_set():
            if probe_coordinator(connect.coordinator, ca_cert=connect.ca_cert):
                return
            if not told:
                self.say(f"waiting for the coordinator at {connect.coordinator}")
                told = True
            self.stop_event.wait(2.0)

    def _supernode_alive(self) -> bool:
        child = self.supernode
        if child is None or child.alive():
            return True
        ran = time.monotonic() - self.started_at
        self.children.stop(child)
        connect = self.policy.connect
        assert connect is not None
        node_id = _node_id(child)
        if node_id is not None:
            self.joined_as = node_id
            if deactivate_node(
                connect.coordinator,
                ca_cert=connect.ca_cert,
                node_key=self.node_key,
                node_id=node_id,
            ):
                self.say(f"node {node_id} marked offline at the coordinator")
        reachable = probe_coordinator(connect.coordinator, ca_cert=connect.ca_cert)
        # Reachable, trusted, and yet the SuperNode never got in: the coordinator refused this
        # site's node key (not enrolled, or removed from the federation).
        if reachable and node_id is None and self.joined_as is None:
            raise SiteStartError(
                f"the SuperNode (pid {child.pid}) exited after {ran:.0f} s without joining "
                "although the coordinator is reachable: it refused this site's node key (is "
                f"the site enrolled?). End of {child.log_path}:\n{child.log_tail()}"
            )
        self.restarts += 1
        if self.restarts > MAX_RESTARTS:
            raise SiteStartError(
                f"the SuperNode exited {self.restarts} times; giving up. End of "
                f"{child.log_path}:\n{child.log_tail()}"
            )
        self.say(f"SuperNode (pid {child.pid}) exited after {ran:.0f} s; rejoining")
        if ran < REFUSED_WITHIN_S:  # it did not get in: the node may still count as online
            self.stop_event.wait(min(5.0 * self.restarts, 30.0))
        self.wait_for_coordinator()
        if self.stop_event.is_set():
            return False
        self.start_supernode()
        self.say(f"SuperNode pid {self.supernode.pid if self.supernode else '?'} restarted")
        return True

    def run(self) -> int:
        site, connect = self.policy.site, self.policy.connect
        assert site is not None and connect is not None
        torch.set_num_threads(site.torch_threads)
        self.say(f"site {site.name}: loading base model {site.base_model} and {site.data}")
        deployed = DeployedSite(self.policy, self.identity)
        self.say(
            f"site {site.name}: {len(deployed.records)} records; base model "
            f"{deployed.base_model_hash} loaded in {deployed.load_seconds:.1f} s (kept loaded)"
        )
        self.wait_for_coordinator()
        if self.stop_event.is_set():
            return 0
        child = self.start_supernode()
        bundles = list(self.policy.code.bundles) or ["any (none is executed)"]
        for line in (
            f"federation {self.policy.accept.federation_id}: SuperNode pid {child.pid} connects "
            f"out to {connect.coordinator} (TLS, CA {certificate_fingerprint(self.ca)})",
            f"listening on 127.0.0.1:{self.runtime.runtime_port} only (SuperNode Runtime API, "
            "served by this process)",
            f"node key {node_key_fingerprint(self.node_key.public_key())}; signing key "
            f"{fingerprint(self.identity.signing_key.public_key())}",
            # The key receipts are checked with: compare with what `certs init` printed.
            f"coordinator signing key {fingerprint(self.identity.coordinator_key)}",
            f"bundles accepted: {', '.join(bundles)} (this fedsilo submits "
            f"{expected_bundle_hash()})",
        ):
            self.say(line)
        worker = SiteWorker(
            deployed,
            build_client_app(deployed),
            runtime_address=f"127.0.0.1:{self.runtime.runtime_port}",
            stop=self.stop_event,
            say=self.say,
        )
        worker.serve(alive=self._supernode_alive)
        self.say(
            f"site {site.name}: stopped after {worker.stats.tasks} tasks "
            f"({worker.stats.refused} refused)"
        )
        return 0

    def shutdown(self) -> None:
        self.stop_event.set()
        self.children.stop_all()


def run_site(policy_path: Path, *, say: Callable[[str], None] = print) -> int:
    """Start the site described by ``policy_path``; returns when stopped (SIGTERM, SIGINT)."""
    apply_quiet_environment()
    policy = load_site_policy(policy_path)
    service = SiteService(policy, say=say)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        say(f"received {signal.Signals(signum).name}: stopping")
        service.stop_event.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return service.run()
    except ProcessFailedError as error:
        raise SiteStartError(str(error)) from None
    finally:
        service.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
