"""nginx in front of the SuperLink: TLS for the sites, and only the Fleet API paths.

Flower 1.42 serves the Fleet API (what SuperNodes use), the Control API (submit runs,
register SuperNodes; unauthenticated in the open-source build) and the Runtime API (what a
ServerApp uses; unauthenticated without a SuperExec secret) on one HTTP port. The SuperLink
therefore listens on 127.0.0.1 only, and nginx, on the address sites connect to, forwards an
exact allowlist of Fleet API paths (POST only) over TLS to it. Every other path gets 404 from
nginx itself and never reaches Flower.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedsilo.deploy.processes import Child, Children, quiet_environment

# Every route of flwr 1.42's Fleet router (flwr/superlink/routers/fleet/router.py).
FLEET_PATHS: tuple[str, ...] = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)


class NginxError(RuntimeError):
    """nginx is missing or its configuration was refused."""


@dataclass(frozen=True)
class ProxySettings:
    listen_host: str
    listen_port: int
    upstream_port: int  # the SuperLink, on 127.0.0.1
    server_cert: Path  # chain: server certificate, then the CA
    server_key: Path
    ca_cert: Path  # verifies the SuperLink's certificate on the loopback hop
    max_body_bytes: int
    state_dir: Path


def nginx_binary() -> str:
    """The nginx executable (Debian package ``nginx``), or a clear error."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return candidate
    raise NginxError("nginx is not installed (Debian: apt-get install -y nginx)")


def render_config(settings: ProxySettings) -> str:
    """The complete nginx.conf for ``settings``."""
    state = settings.state_dir.resolve()
    paths = "|".join(FLEET_PATHS)
    temp = state / "nginx-temp"
    listen = f"[{settings.listen_host}]" if ":" in settings.listen_host else settings.listen_host
    return f"""# Written by fedsilo coordinator start; regenerated at every start.
daemon off;
master_process on;
worker_processes 1;
pid {state}/nginx.pid;
error_log {state}/nginx-error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {state}/nginx-access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server_tokens off;
    client_max_body_size {settings.max_body_bytes};
    proxy_read_timeout 600s;
    proxy_send_timeout 600s;
    server {{
        listen {listen}:{settings.listen_port} ssl;
        server_name _;
        ssl_certificate {settings.server_cert.resolve()};
        ssl_certificate_key {settings.server_key.resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;
        # The Fleet API, exactly: the normalized path must be one of these routes (\\z, not $,
        # which also matches before a final newline), and the upstream gets the route's own
        # name, never the client's decoded path.
        location ~ ^/v1/fleet/({paths})\\z {{
            limit_except POST {{ deny all; }}
            proxy_pass https://127.0.0.1:{settings.upstream_port}/v1/fleet/$1;
            proxy_http_version 1.1;
            # Stream bodies both ways: nothing is spooled to disk (updates stay in memory,
            # and the worker needs no writable temp folder).
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_set_header Connection "";
            proxy_set_header Host localhost;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {settings.ca_cert.resolve()};
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
        }}
        # Control API, Runtime API, docs, health: not for sites.
        location / {{ return 404; }}
    }}
}}
"""


def start_proxy(children: Children, settings: ProxySettings) -> Child:
    """Write the configuration, check it with ``nginx -t``, and start nginx as a child."""
    binary = nginx_binary()
    state = settings.state_dir
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (state / "nginx-temp" / sub).mkdir(parents=True, exist_ok=True)
    conf = state / "nginx.conf"
    conf.write_text(render_config(settings), encoding="utf-8")
    argv = [binary, "-e", str((state / "nginx-error.log").resolve()), "-p", str(state.resolve())]
    argv += ["-c", str(conf.resolve())]
    check = subprocess.run(
        [*argv, "-t"], capture_output=True, text=True, env=quiet_environment(), check=False
    )
    if check.returncode != 0:
        raise NginxError(f"{conf}: nginx refused the configuration:\n{check.stderr.strip()}")
    return children.start("nginx", argv, log_path=state / "nginx.log")
