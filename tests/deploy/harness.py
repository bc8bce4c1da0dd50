"""A whole deployment on 127.0.0.1 for tests: material, configs, and processes stopped by PID.

Everything is made with the `fedsilo` commands a real deployment uses (`certs init`, `certs
site`), the configs are TOML files as an operator writes them, and `fedsilo coordinator start`
and `fedsilo site start` run as separate processes. Ports are chosen free at run time. Every
process started here is stopped by its own PID (SIGTERM, then SIGKILL) when the harness is
closed, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedsilo.cli.main import main
from fedsilo.config import parse_config
from fedsilo.data.records import ChatRecord
from fedsilo.data.tasks import build_task
from fedsilo.deploy.processes import free_port

SITES = ("alpha", "beta", "gamma")


def coordinator_config(
    tiny_model_dir: Path, listen_port: int, *, rounds: int, round_timeout_s: float
) -> dict[str, Any]:
    return {
        "run": {"name": "deployed", "seed": 0, "rounds": rounds, "torch_threads": 1},
        "federation": {"id": "pilot"},
        "model": {"base": str(tiny_model_dir)},
        "lora": {"rank": 4, "alpha": 8.0},
        "task": {
            "name": "icd10",
            "num_sites": len(SITES),
            "examples_per_site": 8,
            "gold_size": 6,
            "system_prompt": "Code it.",
        },
        # Eager, as in tests/conftest.py (compiling costs seconds per site process).
        "train": {
            "local_steps": 2,
            "batch_size": 2,
            "learning_rate": 0.01,
            "max_length": 96,
            "compile": "off",
        },
        "strategy": {"name": "fedavg", "min_sites": 2, "round_timeout_s": round_timeout_s},
        "evaluation": {"max_new_tokens": 4, "batch_size": 8},
        "deployment": {
            "listen_host": "127.0.0.1",
            "listen_port": listen_port,
            "certs_dir": "certs",
            "state_dir": "coordinator-state",
            "run_dir": "run",
            "join_timeout_s": 120.0,
        },
    }


@dataclass
class Started:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@dataclass
class Deployment:
    root: Path
    tiny_model_dir: Path
    listen_port: int
    config_path: Path
    processes: list[Started] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.root / "coordinator" / "run"

    def policy_path(self, site: str) -> Path:
        return self.root / site / "policy.toml"

    def _spawn(self, name: str, argv: list[str]) -> Started:
        log_path = self.root / "logs" / f"{name}-{len(self.processes)}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedsilo.cli.main", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.root,
            )
        started = Started(name, process, log_path)
        self.processes.append(started)
        return started

    def start_coordinator(self, *, resume: bool = False) -> Started:
        argv = ["coordinator", "start", str(self.config_path)]
        return self._spawn("coordinator", [*argv, "--resume"] if resume else argv)

    def start_site(self, site: str) -> Started:
        return self._spawn(f"site-{site}", ["site", "start", str(self.policy_path(site))])

    def stop(self, started: Started, *, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if started.process.poll() is None:
            started.process.send_signal(sig)
            try:
                started.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                started.process.kill()
                started.process.wait(timeout=timeout)
        return int(started.process.returncode)

    def close(self) -> None:
        for started in reversed(self.processes):
            self.stop(started, timeout=20)

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    watch: list[Started],
    poll_s: float = 0.25,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for started in watch:
            if started.process.poll() is not None and not condition():
                raise AssertionError(
                    f"{started.name} exited ({started.process.returncode}) while waiting for "
                    f"{what}:\n{started.log()[-4000:]}"
                )
        time.sleep(poll_s)
    logs = "\n".join(f"--- {s.name}\n{s.log()[-3000:]}" for s in watch)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{logs}")


def write_passphrase(site_dir: Path) -> Path:
    """The site's key passphrase file (the policy's [site] passphrase_file), mode 0600."""
    site_dir.mkdir(parents=True, exist_ok=True)
    path = site_dir / "passphrase"
    path.write_text(f"passphrase of {site_dir.name}\n")
    path.chmod(0o600)
    return path


def write_site_policy(
    site_dir: Path, name: str, *, listen_port: int, extra: dict[str, Any] | None = None
) -> Path:
    policy: dict[str, Any] = {
        "accept": {"federation_id": "pilot"},
        "limits": {"min_cohort": 2, "lora_rank": [1, 16]},
        "site": {
            "name": name,
            "data": "records.jsonl",
            "base_model": "MODEL",
            "keys_dir": "keys",
            "passphrase_file": "passphrase",
            "state_dir": "state",
            "compile": "off",
        },
        "connect": {
            "coordinator": f"127.0.0.1:{listen_port}",
            "ca_cert": "keys/ca.pem",
            "coordinator_key": "keys/coordinator-signing.pub",
        },
    }
    for section, values in (extra or {}).items():
        policy.setdefault(section, {}).update(values)
    path = site_dir / "policy.toml"
    path.write_text(tomli_w.dumps(policy), encoding="utf-8")
    return path


def build_deployment(
    root: Path,
    tiny_model_dir: Path | str,
    *,
    rounds: int = 2,
    round_timeout_s: float = 60.0,
    train: dict[str, Any] | None = None,
    site_policy: dict[str, Any] | None = None,
) -> Deployment:
    """Material for a coordinator and three sites, made with the `fedsilo certs` commands.

    ``tiny_model_dir`` is the base model (a folder, or the name of the embedded model);
    ``train`` overrides the [train] section, ``site_policy`` adds to every site's policy.
    """
    root = Path(root).resolve()  # the processes started later run in other folders
    listen_port = free_port()
    coordinator = root / "coordinator"
    assert (
        main(["certs", "init", "--out", str(coordinator / "certs"), "--federation", "pilot"]) == 0
    )
    data = coordinator_config(
        Path(tiny_model_dir), listen_port, rounds=rounds, round_timeout_s=round_timeout_s
    )
    data["model"]["base"] = str(tiny_model_dir)
    data["train"].update(train or {})
    task = build_task(parse_config(data, source="harness").task, seed=0)
    enrolled = []
    for index, name in enumerate(SITES):
        site_dir = root / name
        keys = site_dir / "keys"
        ca = coordinator / "certs" / "ca.pem"
        secret = write_passphrase(site_dir)
        command = ["certs", "site", "--name", name, "--out", str(keys), "--ca", str(ca)]
        assert main([*command, "--passphrase-file", str(secret)]) == 0
        signing_pub = coordinator / "certs" / "coordinator-signing.pub"
        (keys / "coordinator-signing.pub").write_bytes(signing_pub.read_bytes())
        request = tomllib.loads((keys / f"{name}.enroll.toml").read_text())
        enrolled.extend(request["federation"]["sites"])
        records = task.sites[index].records
        lines = [
            json.dumps({"prompt": r.prompt, "response": r.response})
            for r in records
            if isinstance(r, ChatRecord)
        ]
        (site_dir / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        policy = write_site_policy(site_dir, name, listen_port=listen_port, extra=site_policy)
        policy.write_text(policy.read_text().replace('"MODEL"', json.dumps(str(tiny_model_dir))))
    data["federation"]["sites"] = enrolled
    config_path = coordinator / "federation.toml"
    config_path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return Deployment(root, Path(tiny_model_dir), listen_port, config_path)
