"""Run a whole federation on one machine, with the in-process grid or Flower's Ray engine.

Both run the same ServerApp and ClientApp. "inprocess" delivers messages in this process
(fast, small: tests and the demo; ``run.concurrent_sites`` sites train at a time); "ray" uses
Flower's simulation engine, one actor per concurrently training site.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context, RecordDict

from fedsilo.client.app import build_client_app
from fedsilo.config import FedsiloConfig
from fedsilo.data.tasks import build_task
from fedsilo.server.app import ServerJob, build_server_app, require_resumable
from fedsilo.server.federation import FederationError, ProgressReporter
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.enrollment import enroll_simulated_federation
from fedsilo.simulation.inprocess_grid import InProcessGrid
from fedsilo.simulation.sites import SimulatedSites, policy_path


@dataclass(frozen=True)
class SimulationRequest:
    """A run to simulate: its config, its folder, whether to resume, where progress goes."""

    config: FedsiloConfig
    run_dir: Path
    resume: bool
    reporter: ProgressReporter


def prepare_job(request: SimulationRequest) -> ServerJob:
    """Enroll the simulated sites' keys (created once, reused on resume) and build the job."""
    config = request.config
    if request.resume:
        # Before enrollment, which would create keys in a folder that holds no run.
        require_resumable(request.run_dir)
    site_names = [site.name for site in build_task(config.task, seed=config.run.seed).sites]
    for name in site_names:
        policy_path(config, name)  # every site refuses without its policy: stop before keys
    membership = enroll_simulated_federation(
        request.run_dir, federation=config.federation, site_names=site_names
    )
    return ServerJob(
        config=config,
        run_dir=request.run_dir,
        resume=request.resume,
        reporter=request.reporter,
        membership=membership,
    )


def _sites(job: ServerJob) -> SimulatedSites:
    return SimulatedSites(job.config, run_dir=job.run_dir, membership=job.membership)


def run_inprocess(job: ServerJob) -> None:
    """All sites in this process: ``run.concurrent_sites`` at a time, each in its own thread."""
    run = job.config.run
    with InProcessGrid(
        build_client_app(_sites(job)),
        num_nodes=job.config.num_sites,
        lanes=run.concurrent_sites,
        lane_threads=run.site_threads,
    ) as grid:
        server_context = Context(
            run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}
        )
        build_server_app(job)(grid, server_context)


def run_ray(job: ServerJob) -> None:
    """Flower's simulation engine (Ray): about 25 s of start-up and 2 GB more than in-process."""
    from flwr.simulation import run_simulation  # imports Ray: only when asked for

    config = job.config
    run_simulation(
        server_app=build_server_app(job),
        client_app=build_client_app(_sites(job)),
        num_supernodes=config.num_sites,
        backend_config={
            "client_resources": {"num_cpus": config.run.torch_threads, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "log_to_driver": True},
        },
    )
    # The engine re-raises what the ServerApp raised; should it ever return normally after a
    # failure, the run folder still says how the run went.
    folder = RunFolder(job.run_dir)
    status = folder.read_json(folder.status_path)
    if status.get("status") != "completed":
        raise FederationError(f"run failed: {status.get('reason', status)}")


ENGINES: dict[str, Callable[[ServerJob], None]] = {"inprocess": run_inprocess, "ray": run_ray}


def simulate(request: SimulationRequest) -> None:
    """Run ``request`` on the engine its config names, with torch pinned to its thread budget."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(request.config.run.torch_threads)
    if request.config.clusters.method != "none":
        _simulate_clustered(request)
        return
    job = prepare_job(request)
    ENGINES[request.config.run.engine](job)


def _simulate_clustered(request: SimulationRequest) -> None:
    """One federation per cluster (fedsilo.simulation.clustered), each on the configured engine."""
    from fedsilo.config import ConfigError
    from fedsilo.simulation.clustered import simulate_clustered

    if request.resume:
        raise ConfigError(
            f"{request.run_dir}: a clustered run cannot be resumed as a whole; resume the "
            "cluster that stopped (RUN/clusters/NAME) with its own config.toml"
        )

    def run_cluster(config: FedsiloConfig, run_dir: Path) -> None:
        simulate(SimulationRequest(config, run_dir, resume=False, reporter=request.reporter))

    simulate_clustered(
        request.config, run_dir=request.run_dir, reporter=request.reporter, run_cluster=run_cluster
    )
