"""Deployment commands: `fedsilo certs`, `fedsilo coordinator start`, `fedsilo site start`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedsilo.crypto.certs import DEFAULT_SANS


def cmd_certs_init(args: argparse.Namespace) -> int:
    from fedsilo.deploy.material import init_coordinator_material

    sans = tuple(dict.fromkeys([*DEFAULT_SANS, *args.san]))
    material = init_coordinator_material(
        args.out, sans=sans, valid_days=args.days, federation=args.federation
    )
    print(f"coordinator TLS certificate for {', '.join(sans)}, valid {args.days} days")
    for line in material.describe():
        print(line)
    return 0


def cmd_certs_site(args: argparse.Namespace) -> int:
    from fedsilo.config import ConfigError
    from fedsilo.crypto import PASSPHRASE_ENV, read_passphrase
    from fedsilo.deploy.material import init_site_material

    passphrase = read_passphrase(args.passphrase_file, source=f"site {args.name}")
    if passphrase is None and not args.unencrypted:
        raise ConfigError(
            f"site {args.name}: the signing key is encrypted by default; give "
            f"--passphrase-file FILE or set {PASSPHRASE_ENV} (at least 12 bytes), or pass "
            "--unencrypted to rely on the file mode alone"
        )
    if passphrase is not None and args.unencrypted:
        raise ConfigError("--unencrypted and a passphrase were both given; choose one")
    material = init_site_material(args.name, args.out, ca_cert=args.ca, passphrase=passphrase)
    for line in material.describe():
        print(line)
    return 0


def cmd_coordinator_start(args: argparse.Namespace) -> int:
    from fedsilo.cli.progress import ConsoleReporter
    from fedsilo.config import load_config
    from fedsilo.data.tasks import task_metric
    from fedsilo.deploy.coordinator import run_coordinator

    reporter = ConsoleReporter(metric=task_metric(load_config(args.config).task))

    def say(text: str) -> None:
        reporter.console.print(text, markup=False, soft_wrap=True)

    return run_coordinator(args.config, resume=args.resume, reporter=reporter, say=say)


def cmd_site_start(args: argparse.Namespace) -> int:
    from fedsilo.deploy.site import run_site
    from fedsilo.training.progress import progress_lines, progress_to

    def say(text: str) -> None:
        print(text, flush=True)

    # The worker's local training reports its steps on the site's own output.
    with progress_to(progress_lines(say)):
        return run_site(args.policy, say=say)


def add_deploy_commands(commands: Any) -> None:
    """Register the deployment subcommands on the `fedsilo` parser's subparsers."""
    certs = commands.add_parser(
        "certs", help="TLS and node-authentication material for a deployment"
    ).add_subparsers(dest="certs_command", required=True)
    init = certs.add_parser("init", help="create the federation CA and the coordinator's TLS cert")
    init.add_argument("--out", type=Path, required=True, help="folder for the material")
    init.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a DNS name or IP address sites use to reach the coordinator (repeatable; "
        "localhost and 127.0.0.1 are always included)",
    )
    init.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    init.add_argument("--federation", default="fedsilo", help="name used in the certificates")
    init.set_defaults(handler=cmd_certs_init)
    site = certs.add_parser("site", help="create a site's signing and SuperNode keys")
    site.add_argument("--name", required=True, help="the site's name in the federation")
    site.add_argument("--out", type=Path, required=True, help="folder for the site's material")
    site.add_argument("--ca", type=Path, help="the federation's ca.pem, copied into --out")
    site.add_argument(
        "--passphrase-file",
        type=Path,
        help="encrypt the signing key with this file's content (default: $FEDSILO_KEY_PASSPHRASE)",
    )
    site.add_argument(
        "--unencrypted", action="store_true", help="write the signing key without a passphrase"
    )
    site.set_defaults(handler=cmd_certs_site)

    coordinator = commands.add_parser(
        "coordinator", help="run a federation on Flower's deployment engine"
    ).add_subparsers(dest="coordinator_command", required=True)
    start = coordinator.add_parser("start", help="start the SuperLink and run the federation")
    start.add_argument("config", type=Path)
    start.add_argument(
        "--resume", action="store_true", help="continue the run folder from its last checkpoint"
    )
    start.set_defaults(handler=cmd_coordinator_start)

    site_cmd = commands.add_parser("site", help="run one site of a deployed federation")
    site_start = site_cmd.add_subparsers(dest="site_command", required=True).add_parser(
        "start", help="start this site's SuperNode and worker"
    )
    site_start.add_argument("policy", type=Path, help="the site's policy file (TOML)")
    site_start.set_defaults(handler=cmd_site_start)
