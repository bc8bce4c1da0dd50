"""The coordinator's use of Flower's Control API, over loopback only.

In open-source Flower the Control API (submit runs, register SuperNodes) has no
authentication and is served on the SuperLink's port. fedsilo binds the SuperLink to
127.0.0.1 and only this process, on the coordinator's machine, talks to it; sites reach the
Fleet API through nginx, which forwards nothing else (:mod:`fedsilo.deploy.nginx`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

log = logging.getLogger(__name__)


class ControlError(RuntimeError):
    """The SuperLink refused or failed a Control API request."""


@dataclass(frozen=True)
class NodeInfo:
    node_id: int
    name: str
    status: str  # "registered", "online", "offline", ...
    public_key_pem: bytes


@dataclass(frozen=True)
class RunStatus:
    status: str  # "pending", "starting", "running", "finished"
    sub_status: str  # "completed", "failed", "stopped" once finished
    details: str


class Control:
    """A Control API client for the SuperLink at ``address`` (TLS, verified with ``ca_cert``)."""

    def __init__(self, address: str, *, ca_cert: Path) -> None:
        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=Path(ca_cert).read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    def close(self) -> None:
        self._client.close()

    def nodes(self) -> list[NodeInfo]:
        response = self._client.ListNodes(ListNodesRequest())
        return [
            NodeInfo(
                node_id=int(info.node_id),
                name=str(info.name),
                status=str(info.status),
                public_key_pem=bytes(info.public_key),
            )
            for info in response.nodes_info
        ]

    def register_node(self, *, public_key_pem: bytes, name: str) -> int:
        """Register a SuperNode's public key (idempotent: a known key keeps its node id)."""
        for node in self.nodes():
            if node.public_key_pem == public_key_pem:
                return node.node_id
        response = self._client.RegisterNode(
            RegisterNodeRequest(public_key=public_key_pem, name=name)
        )
        if not response.node_id:
            raise ControlError(f"the SuperLink did not register the node key of site {name!r}")
        return int(response.node_id)

    def start_run(self, bundle: bytes) -> int:
        """Submit a run with ``bundle`` as its FAB; returns Flower's run id."""
        fab = Fab(hashlib.sha256(bundle).hexdigest(), bundle, {})
        response = self._client.StartRun(
            StartRunRequest(
                fab=fab_to_proto(fab), override_config=user_config_to_proto({}), federation=""
            )
        )
        if not response.HasField("run_id"):
            raise ControlError("the SuperLink did not create the run")
        return int(response.run_id)

    def run_status(self, run_id: int) -> RunStatus:
        response = self._client.ListRuns(ListRunsRequest(run_id=run_id))
        if run_id not in response.run_dict:
            raise ControlError(f"the SuperLink knows no run {run_id}")
        status = response.run_dict[run_id].status
        return RunStatus(str(status.status), str(status.sub_status), str(status.details))
