"""`fedsilo coordinator start CONFIG`: the SuperLink, its nginx front, and the federation.

What runs on the coordinator's machine:

- ``flower-superlink`` on 127.0.0.1 only, with TLS (the federation's CA), SuperNode
  authentication on (only registered node keys are admitted), ``--isolation process`` (Flower
  starts no ServerApp process, and installs nothing), and telemetry off.
- nginx on ``[deployment] listen_host:listen_port``, the only address sites reach: TLS with
  the coordinator's certificate, and an exact allowlist of Fleet API paths
  (:mod:`fedsilo.deploy.nginx`).
- This process: it registers each enrolled site's node key through the Control API (over
  loopback), waits for the sites to connect, submits the run with fedsilo's bundle, takes the
  run's ServerApp task itself from the SuperLink's Runtime API and runs the installed fedsilo
  ServerApp over :class:`~fedsilo.deploy.bounded_grid.BoundedHttpGrid` (Flower's HttpGrid,
  bounding what each site's reply may cost to pull and inflate). Its outcome is pushed back
  to the SuperLink, and the command reports the SuperLink's own status of the run (a failed
  run exits non-zero).

``--resume`` continues the run folder from its last checkpoint (same run id and ledger).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch
from flwr.common.serde import context_from_proto, context_to_proto, run_from_proto
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullTaskInputRequest,
    PushTaskOutputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity

from fedsilo.config import ConfigError, DeploymentSection, FedsiloConfig, load_config
from fedsilo.crypto import fingerprint, public_key_text, read_private_key
from fedsilo.crypto.certs import (
    certificate_fingerprint,
    node_key_fingerprint,
    node_public_key_pem,
    parse_node_public_key,
    read_certificate,
)
from fedsilo.deploy.bounded_grid import BoundedHttpGrid
from fedsilo.deploy.bundle import build_bundle, bundle_hash
from fedsilo.deploy.control import Control, RunStatus
from fedsilo.deploy.material import COORDINATOR_SIGNING
from fedsilo.deploy.nginx import ProxySettings, start_proxy
from fedsilo.deploy.processes import (
    Child,
    Children,
    apply_quiet_environment,
    flower_binary,
    free_port,
    quiet_environment,
    wait_for_https,
    wait_for_port,
)
from fedsilo.server.app import ServerJob, execute
from fedsilo.server.federation import FederationError, ProgressReporter
from fedsilo.server.membership import Membership, load_membership, save_membership
from fedsilo.server.run_folder import RunFolder

log = logging.getLogger(__name__)

TASK_WAIT_S = 120.0


class CoordinatorError(RuntimeError):
    """The coordinator cannot start or the run did not complete; says why."""


class Stopped(Exception):  # noqa: N818 - a request, not a failure
    """SIGTERM or SIGINT arrived."""


def not_loaded_from_bundle() -> None:  # pragma: no cover - named in the bundle, never called
    raise RuntimeError("the fedsilo coordinator runs its installed ServerApp, never a bundle")


@dataclass(frozen=True)
class CoordinatorFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    signing_key: Path


def coordinator_files(config: FedsiloConfig) -> CoordinatorFiles:
    deployment = _deployment(config)
    certs = deployment.certs_dir
    files = CoordinatorFiles(
        ca_cert=certs / "ca.pem",
        server_cert=certs / "coordinator.pem",
        server_key=certs / "coordinator.key",
        signing_key=config.federation.coordinator_key or certs / f"{COORDINATOR_SIGNING}.key",
    )
    for path in (files.ca_cert, files.server_cert, files.server_key, files.signing_key):
        if not path.exists():
            raise ConfigError(
                f"{path}: not found; create the coordinator's material with "
                f"`fedsilo certs init --out {certs}`"
            )
    return files


def _deployment(config: FedsiloConfig) -> DeploymentSection:
    if config.deployment is None:
        raise ConfigError("the config has no [deployment] section")
    return config.deployment


def check_enrollment(config: FedsiloConfig) -> dict[str, bytes]:
    """Each enrolled site's node key as the PEM Flower registers; errors name the field."""
    sites = config.federation.sites
    if not sites:
        raise ConfigError("[[federation.sites]]: a deployment enrolls at least one site")
    if len(sites) != config.num_sites:
        raise ConfigError(
            f"[[federation.sites]] enrolls {len(sites)} sites but the task has "
            f"{config.num_sites} (task.num_sites); they must agree"
        )
    keys: dict[str, bytes] = {}
    for index, site in enumerate(sites):
        if site.node_public_key is None:
            raise ConfigError(
                f"federation.sites[{index}] ({site.name}): node_public_key is required in a "
                "deployment (NAME.node.pub from `fedsilo certs site`)"
            )
        key = parse_node_public_key(
            site.node_public_key, source=f"federation.sites[{index}].node_public_key"
        )
        keys[site.name] = node_public_key_pem(key)
    # One key, one place on the roster: Flower would register a node key twice as one node,
    # and one signing key held by two sites would count twice towards a cohort.
    for field, values in (
        ("node_public_key", keys),
        ("public_key", {site.name: site.public_key for site in sites}),
    ):
        holders: dict[object, str] = {}
        for name, value in values.items():
            if value in holders:
                raise ConfigError(
                    f"[[federation.sites]]: sites {holders[value]} and {name} enroll the same "
                    f"{field}; each site needs its own keys"
                )
            holders[value] = name
    return keys


def deployment_membership(
    config: FedsiloConfig, *, run_dir: Path, signing_key: Path, resume: bool
) -> Membership:
    """The run's pinned identities: reused from RUN/federation.json, or created for a new run."""
    path = RunFolder(run_dir).membership_path
    pins = {site.name: site.public_key for site in config.federation.sites}
    if path.exists():
        existing = load_membership(path)
        if (
            existing.federation_id != config.federation.id
            or dict(existing.site_public_keys) != pins
        ):
            raise ConfigError(
                f"{path}: the run was enrolled as federation {existing.federation_id!r} with "
                f"other site keys than [[federation.sites]] now pins"
            )
        return existing
    if resume:
        raise ConfigError(f"{path}: not found; there is no run to resume in {run_dir}")
    public = public_key_text(read_private_key(signing_key, passphrase=None).public_key())
    membership = Membership(
        federation_id=config.federation.id,
        run_id=uuid.uuid4().hex,
        coordinator_key_path=signing_key,
        coordinator_public_key=public,
        site_public_keys=pins,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_membership(membership, path)
    return membership


class CoordinatorService:
    """One coordinator start: children, enrollment, the run."""

    def __init__(
        self,
        config: FedsiloConfig,
        *,
        resume: bool,
        reporter: ProgressReporter,
        say: Callable[[str], None],
    ) -> None:
        self.config = config
        self.deployment = _deployment(config)
        self.resume = resume
        self.reporter = reporter
        self.say = say
        self.files = coordinator_files(config)
        self.node_keys = check_enrollment(config)
        self.children = Children()
        self.superlink_port = self.deployment.superlink_port or free_port()
        self.superlink_address = f"127.0.0.1:{self.superlink_port}"
        self.state_dir = self.deployment.state_dir
        self.join_seconds: dict[str, float] = {}
        self.superlink: Child | None = None
        self.proxy: Child | None = None

    # -- processes ---------------------------------------------------------------------------

    def start_superlink(self) -> None:
        argv = [
            flower_binary("flower-superlink"),
            "--ssl-certfile",
            str(self.files.server_cert),
            "--ssl-keyfile",
            str(self.files.server_key),
            "--ssl-ca-certfile",
            str(self.files.ca_cert),
            "--enable-supernode-auth",
            "--isolation",
            "process",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.superlink_port),
        ]
        env = quiet_environment({"FLWR_HOME": str((self.state_dir / "flwr").resolve())})
        self.superlink = self.children.start(
            "flower-superlink", argv, log_path=self.state_dir / "superlink.log", env=env
        )
        wait_for_https(
            f"https://{self.superlink_address}/health",
            ca_cert=self.files.ca_cert,
            timeout=60,
            children=self.children,
        )

    def start_proxy(self) -> None:
        deployment = self.deployment
        settings = ProxySettings(
            listen_host=deployment.listen_host,
            listen_port=deployment.listen_port,
            upstream_port=self.superlink_port,
            server_cert=self.files.server_cert,
            server_key=self.files.server_key,
            ca_cert=self.files.ca_cert,
            # An update plus Flower's framing; the SuperLink checks the rest.
            max_body_bytes=self.config.federation.max_update_bytes + 16 * 1024 * 1024,
            state_dir=self.state_dir,
        )
        self.proxy = start_proxy(self.children, settings)
        host = (
            "127.0.0.1" if deployment.listen_host in ("0.0.0.0", "::") else deployment.listen_host
        )
        wait_for_port(host, deployment.listen_port, timeout=30, children=self.children)

    # -- federation --------------------------------------------------------------------------

    def enroll(self, control: Control) -> dict[int, str]:
        """Register every enrolled site's node key with the SuperLink."""
        nodes: dict[int, str] = {}
        for name, pem in self.node_keys.items():
            nodes[control.register_node(public_key_pem=pem, name=name)] = name
        return nodes

    def wait_for_sites(self, control: Control, nodes: dict[int, str]) -> None:
        wanted = self.deployment.min_sites_connected or len(nodes)
        started = time.monotonic()
        deadline = started + self.deployment.join_timeout_s
        while True:
            self.children.check()
            online = {n.node_id for n in control.nodes() if n.status == "online"}
            for node_id, name in nodes.items():
                if node_id in online and name not in self.join_seconds:
                    self.join_seconds[name] = time.monotonic() - started
                    self.say(
                        f"site {name} joined (node {node_id}) after {self.join_seconds[name]:.1f} s"
                    )
            if len(online & set(nodes)) >= wanted:
                return
            if time.monotonic() > deadline:
                missing = sorted(name for node, name in nodes.items() if node not in online)
                raise CoordinatorError(
                    f"only {len(online & set(nodes))} of the {wanted} sites needed joined within "
                    f"{self.deployment.join_timeout_s:g} s; not connected: {missing}"
                )
            time.sleep(0.5)

    def serve_run(self, flower_run_id: int, job: ServerJob) -> None:
        """Take the run's ServerApp task from the SuperLink and run fedsilo's ServerApp."""
        ca = self.files.ca_cert.read_bytes()
        acquirer = RuntimeHttpClient.from_server_address(
            server_address=self.superlink_address,
            insecure=False,
            root_certificates=ca,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        deadline = time.monotonic() + TASK_WAIT_S
        try:
            while True:
                response = acquirer.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP.value])
                )
                if response.HasField("task") and response.token:
                    if int(response.task.run_id) != flower_run_id:
                        raise CoordinatorError(
                            f"the SuperLink offered a task of run {response.task.run_id}, not of "
                            f"the run {flower_run_id} this coordinator submitted"
                        )
                    token = str(response.token)
                    break
                if time.monotonic() > deadline:
                    raise CoordinatorError(f"run {flower_run_id}: no ServerApp task was offered")
                time.sleep(0.2)
        finally:
            acquirer.close()
        grid = BoundedHttpGrid(
            runtime_api_address=self.superlink_address,
            root_certificates=ca,
            token=token,
            max_update_bytes=self.config.federation.max_update_bytes,
        )
        runtime = grid._runtime_client
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(runtime))
        heartbeat.start()
        sub_status, details = "failed", "the ServerApp did not finish"
        context = None
        try:
            task_input = runtime.PullTaskInput(PullTaskInputRequest())
            TaskIdentity.task_id = task_input.task_id
            TaskIdentity.run_id = task_input.run.run_id
            TaskIdentity.node_id = task_input.context.node_id
            context = context_from_proto(task_input.context)
            grid.set_run(run_from_proto(task_input.run))
            execute(grid, job)
            sub_status, details = "completed", ""
        except BaseException as error:
            details = f"{type(error).__name__}: {error}"
            raise
        finally:
            try:
                runtime.PushTaskOutput(
                    PushTaskOutputRequest(
                        context=context_to_proto(context) if context is not None else None,
                        sub_status=sub_status,
                        details=details[:2000],
                    )
                )
            except Exception as error:  # the SuperLink may already be gone (shutdown)
                log.warning("could not report the run's outcome to the SuperLink: %s", error)
            heartbeat.stop()
            grid.close()

    def run(self) -> RunStatus:
        config, deployment = self.config, self.deployment
        self.state_dir.mkdir(parents=True, exist_ok=True)
        membership = deployment_membership(
            config,
            run_dir=deployment.run_dir,
            signing_key=self.files.signing_key,
            resume=self.resume,
        )
        bundle = build_bundle()
        self.start_superlink()
        self.start_proxy()
        server_cert = read_certificate(self.files.server_cert)
        assert self.superlink is not None and self.proxy is not None
        for line in (
            f"federation {membership.federation_id} (run {membership.run_id}"
            f"{', resumed' if self.resume else ''}) -> {deployment.run_dir}",
            f"sites connect to {deployment.listen_host}:{deployment.listen_port} (nginx pid "
            f"{self.proxy.pid}: TLS, Fleet API paths only)",
            f"SuperLink pid {self.superlink.pid} listens on {self.superlink_address} only "
            "(loopback; Control and Runtime APIs never exposed)",
            f"TLS certificate {certificate_fingerprint(server_cert)}",
            f"coordinator signing key {fingerprint(membership.coordinator_key())}",
            f"app bundle {bundle_hash(bundle)} (carries no code; sites run their own)",
        ):
            self.say(line)
        control = Control(self.superlink_address, ca_cert=self.files.ca_cert)
        try:
            nodes = self.enroll(control)
            for site in config.federation.sites:
                assert site.node_public_key is not None
                key = parse_node_public_key(site.node_public_key, source=site.name)
                self.say(
                    f"enrolled site {site.name}: node key {node_key_fingerprint(key)}, signing "
                    f"key {membership.fingerprints()[site.name]}"
                )
            self.wait_for_sites(control, nodes)
            flower_run = control.start_run(bundle)
            self.say(f"submitted Flower run {flower_run}")
            job = ServerJob(
                config=config,
                run_dir=deployment.run_dir,
                resume=self.resume,
                reporter=self.reporter,
                membership=membership,
            )
            # A failed run's reason is in the run folder and the SuperLink's status below.
            with contextlib.suppress(FederationError):
                self.serve_run(flower_run, job)
            status = control.run_status(flower_run)
            for _ in range(50):
                if status.status == "finished":
                    break
                time.sleep(0.1)
                status = control.run_status(flower_run)
            return status
        finally:
            control.close()

    def shutdown(self) -> None:
        self.children.stop_all()


def run_coordinator(
    config_path: Path,
    *,
    resume: bool,
    reporter: ProgressReporter,
    say: Callable[[str], None] = print,
) -> int:
    """Start the coordinator for ``config_path``; 0 when the run completed."""
    apply_quiet_environment()
    config = load_config(config_path)
    torch.set_num_threads(config.run.torch_threads)
    service = CoordinatorService(config, resume=resume, reporter=reporter, say=say)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        raise Stopped(f"received {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = service.run()
    except Stopped as stop:
        say(f"{stop}: stopped; continue with `fedsilo coordinator start {config_path} --resume`")
        return 130
    finally:
        service.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    folder = RunFolder(_deployment(config).run_dir)
    outcome = folder.read_json(folder.status_path) if folder.status_path.exists() else {}
    say(
        f"Flower run status: {status.status}/{status.sub_status}"
        f"{' (' + status.details + ')' if status.details else ''}; run folder: "
        f"{outcome.get('status', 'unknown')}"
    )
    if status.sub_status != "completed" or outcome.get("status") != "completed":
        raise CoordinatorError(
            f"the run did not complete: {outcome.get('reason', status.details or status.status)}"
        )
    return 0
