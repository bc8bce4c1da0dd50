"""Run a whole federation on one machine, with the in-process grid or Flower's Ray engine.

Both run the same ServerApp and ClientApp. "inprocess" delivers messages synchronously in this
process (fast, small: tests and the demo); "ray" uses Flower's simulation engine, one actor per
concurrently training site.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from flwr.app import Context, RecordDict

from fedsilo.client.app import build_client_app
from fedsilo.client.site import SimulatedSites
from fedsilo.server.app import ServerJob, build_server_app
from fedsilo.server.federation import FederationError
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.inprocess_grid import InProcessGrid


def run_inprocess(job: ServerJob) -> None:
    """All sites in this process, one after the other."""
    config = job.config
    client_app = build_client_app(SimulatedSites(config))
    grid = InProcessGrid(client_app, num_nodes=config.num_sites)
    server_context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    build_server_app(job)(grid, server_context)


def run_ray(job: ServerJob) -> None:
    """Flower's simulation engine (Ray): about 25 s of start-up and 2 GB more than in-process."""
    from flwr.simulation import run_simulation  # imports Ray: only when asked for

    config = job.config
    run_simulation(
        server_app=build_server_app(job),
        client_app=build_client_app(SimulatedSites(config)),
        num_supernodes=config.num_sites,
        backend_config={
            "client_resources": {"num_cpus": config.run.torch_threads, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "log_to_driver": True},
        },
    )
    # The engine re-raises what the ServerApp raised; should it ever return normally after a
    # failure, the run folder still says how the run went.
    status = RunFolder(job.run_dir).read_json(RunFolder(job.run_dir).status_path)
    if status.get("status") != "completed":
        raise FederationError(f"run failed: {status.get('reason', status)}")


ENGINES: dict[str, Callable[[ServerJob], None]] = {"inprocess": run_inprocess, "ray": run_ray}


def simulate(job: ServerJob) -> None:
    """Run ``job`` on the engine its config names, with torch pinned to its thread budget."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(job.config.run.torch_threads)
    ENGINES[job.config.run.engine](job)
