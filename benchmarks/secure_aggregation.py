"""Round time and bytes per site: plain FedAvg, fedsilo secagg, Flower's SecAgg+, and HE.

    python benchmarks/secure_aggregation.py [--sites 4 10] [--params 100000 1000000]
                                            [--repeats 3] [--skip-he-above 1000000]

Protocol overhead, no training: every site's local training is replaced by a fixed random
delta, so a round is the protocol alone, run message for message through the in-process grid
(the real ServerApp-side round functions and the real ClientApp handlers). Flower's SecAgg+
(flwr 1.42 legacy API: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on the server,
a ``NumPyClient`` with ``secaggplus_mod`` on the client) runs over the same grid, with every site
in every other site's share graph (``num_shares`` = sites) and the same threshold as ours.

The in-process grid delivers messages one after the other, so ``wall_s`` counts every site's
work in sequence. ``parallel_s`` estimates a real federation, where sites work at the same
time: wall time minus all site time plus, per message type, the slowest site.
Bytes per site: what a site uploads in one round (the content of all its replies: array
bytes, config values, metrics), the mean over sites.

With training: one round of the tiny random Llama (tests' settings, 3 sites), plain FedAvg vs
secagg, through the full ServerApp (``seconds`` of the round in metrics.jsonl, which includes
gold-set evaluation). Writes results/secure-aggregation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict

from fedsilo.client import app as client_app
from fedsilo.client import he as client_he
from fedsilo.client import secagg as client_secagg
from fedsilo.client.app import build_client_app
from fedsilo.client.local import LocalUpdate, local_update
from fedsilo.client.policy import declare_policy
from fedsilo.client.site import Site
from fedsilo.config import parse_config
from fedsilo.crypto import generate_private_key, public_key_text
from fedsilo.ledger import EntryKind, Ledger
from fedsilo.model.adapters import AdapterState
from fedsilo.protocol.records import TASK_KEY, RoundTask, SiteMetrics
from fedsilo.server.federation import collect_round
from fedsilo.server.he_round import collect_he_round
from fedsilo.server.membership import Membership
from fedsilo.server.rounds import FederationPlan, RoundReplies
from fedsilo.server.run_folder import RunFolder
from fedsilo.server.secagg_round import collect_secure_round
from fedsilo.server.strategies import build_strategy
from fedsilo.simulation.inprocess_grid import FIRST_NODE_ID, InProcessGrid

RESULTS = Path(__file__).resolve().parent / "results" / "secure-aggregation.json"
REAL_LOCAL_UPDATE = local_update
HE_DECRYPTION = "the contributors agree on one set; the decrypting site adds their signed inputs"


def record_bytes(content: RecordDict) -> int:
    """Bytes a reply carries: array data, config values and metric values."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for config in content.config_records.values():
        for key, value in config.items():
            values = value if isinstance(value, list) else [value]
            total += len(key) + sum(len(v) if isinstance(v, bytes | str) else 8 for v in values)
    for metrics in content.metric_records.values():
        total += 8 * len(metrics)
    return total


class MeasuringGrid(InProcessGrid):
    """Counts the bytes of every reply per node and times every site's handling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reset()

    def reset(self) -> None:
        self.bytes_up: dict[int, int] = defaultdict(int)
        self.site_seconds: dict[tuple[str, int], float] = defaultdict(float)

    def _deliver(self, message: Message, node: int) -> Message:
        started = time.perf_counter()
        reply = super()._deliver(message, node)
        kind = message.metadata.message_type
        self.site_seconds[(kind, node)] += time.perf_counter() - started
        if not reply.has_error():
            self.bytes_up[node] += record_bytes(reply.content)
        return reply

    def parallel_estimate(self, wall: float) -> float:
        slowest: dict[str, float] = defaultdict(float)
        for (kind, _), seconds in self.site_seconds.items():
            slowest[kind] = max(slowest[kind], seconds)
        return wall - sum(self.site_seconds.values()) + sum(slowest.values())

    def mean_bytes(self) -> float:
        return statistics.mean(self.bytes_up.values()) if self.bytes_up else 0.0


def _template(params: int) -> AdapterState:
    half = params // 2
    return {"m.lora_A.weight": torch.zeros(half), "m.lora_B.weight": torch.zeros(params - half)}


def _deltas(template: AdapterState, sites: int) -> list[AdapterState]:
    generator = torch.Generator().manual_seed(0)
    return [
        {n: (torch.rand(t.shape, generator=generator) - 0.5) * 0.01 for n, t in template.items()}
        for _ in range(sites)
    ]


class FixedSites:
    def __init__(self, sites: list[Site]) -> None:
        self.sites = sites

    def site_for(self, context: Context) -> Site:
        return self.sites[int(context.node_config["partition-id"])]


def _ours(
    mode: str, sites: int, params: int, threshold: int, workdir: Path
) -> Callable[[int], tuple[float, float, float, RoundReplies]]:
    """A function running one round (attempt number given) of ``mode`` over a fresh grid."""
    config = parse_config(
        {
            "task": {"num_sites": sites},
            "strategy": {"min_sites": threshold},
            "secure_aggregation": {} if mode == "plain" else {"mode": mode, "threshold": threshold},
        },
        source="benchmark",
    )
    names = [f"site-{i}" for i in range(sites)]
    keys = {n: generate_private_key() for n in names}
    coordinator = generate_private_key()
    membership = Membership(
        "bench",
        "run",
        workdir / "c.key",
        public_key_text(coordinator.public_key()),
        {n: public_key_text(k.public_key()) for n, k in keys.items()},
    )
    template = _template(params)
    deltas = dict(zip(names, _deltas(template, sites), strict=True))
    site_objects = [
        Site(
            name=n,
            # The benchmark's sites send fixed updates: no model, tokenizer or records.
            model=None,  # type: ignore[arg-type]
            tokenizer=None,  # type: ignore[arg-type]
            examples=(),
            base_model_hash="sha256:" + "0" * 64,
            adapter_template=template,
            signing_key=keys[n],
            coordinator_key=coordinator.public_key(),
            receipts_dir=workdir / n,
            spent_path=workdir / n / "spent.json",
            policy=None,
            peer_keys=membership.site_keys(),
        )
        for n in names
    ]

    def fixed_update(
        message: Message, context: Context, provider: Any, **_how_it_leaves: Any
    ) -> LocalUpdate:
        site = provider.site_for(context)
        task = RoundTask.from_record(message.content.config_records[TASK_KEY])
        metrics = SiteMetrics(num_examples=10, train_loss=None, tokens=0, seconds=0.0)
        return LocalUpdate(site, task, deltas[site.name], metrics, None, declare_policy(None))

    ledger = Ledger.open(workdir / f"{mode}-{sites}-{params}.db", coordinator_key=coordinator)
    ledger.append(EntryKind.RUN_STARTED, {"benchmark": mode})
    plan = FederationPlan(
        config=config,
        folder=RunFolder(workdir / "run"),
        base_model_hash="sha256:" + "0" * 64,
        initial_adapter=template,
        strategy=build_strategy(config.strategy),
        evaluate=None,  # type: ignore[arg-type]
        reporter=None,  # type: ignore[arg-type]
        membership=membership,
        ledger=ledger,
        coordinator_key=coordinator,
    )
    grid = MeasuringGrid(build_client_app(FixedSites(site_objects)), num_nodes=sites)
    nodes = [FIRST_NODE_ID + i for i in range(sites)]
    collect = {"plain": collect_round, "secagg": collect_secure_round, "he": collect_he_round}[mode]

    def one_round(attempt: int) -> tuple[float, float, float, RoundReplies]:
        for module in (client_app, client_secagg, client_he):
            module.local_update = fixed_update  # type: ignore[attr-defined]
        grid.reset()
        started = time.perf_counter()
        replies = collect(grid, plan, template, round_number=1, attempt=attempt, nodes=nodes)
        wall = time.perf_counter() - started
        if not replies.updates.count:
            raise RuntimeError(f"{mode} round failed: {replies.failures}")
        return wall, grid.parallel_estimate(wall), grid.mean_bytes(), replies

    return one_round


def _flower(
    sites: int, params: int, threshold: int
) -> Callable[[int], tuple[float, float, float, None]]:
    """One round of Flower's SecAgg+ (legacy API) over the same in-process grid."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    rng = np.random.default_rng(0)
    updates = [(rng.random(params, dtype=np.float32) - 0.5) * 0.01 for _ in range(sites)]

    class Fixed(NumPyClient):
        def __init__(self, index: int) -> None:
            self.index = index

        def fit(self, parameters: Any, config: Any) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            return [updates[self.index]], 10, {}

    app = ClientApp(
        client_fn=lambda context: Fixed(int(context.node_config["partition-id"])).to_client(),
        mods=[secaggplus_mod],
    )
    grid = MeasuringGrid(app, num_nodes=sites)

    def one_round(attempt: int) -> tuple[float, float, float, None]:
        del attempt
        grid.reset()
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=sites,
            min_available_clients=sites,
            initial_parameters=ndarrays_to_parameters([np.zeros(params, dtype=np.float32)]),
        )
        context = LegacyContext(
            context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=1),
            strategy=strategy,
            client_manager=SimpleClientManager(),
        )
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(num_shares=sites, reconstruction_threshold=threshold)
        )
        started = time.perf_counter()
        workflow(grid, context)
        wall = time.perf_counter() - started
        return wall, grid.parallel_estimate(wall), grid.mean_bytes(), None

    return one_round


def _measure(
    runners: dict[str, Callable[[int], tuple[float, float, float, Any]]], repeats: int
) -> dict[str, dict[str, Any]]:
    """Each runner warmed up once, then ``repeats`` rounds of each, interleaved: the load of a
    shared machine drifts, and interleaving spreads the drift over every system alike."""
    for runner in runners.values():
        runner(100)
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runners}
    for attempt in range(1, repeats + 1):
        for name, runner in runners.items():
            wall, parallel, size, _ = runner(attempt)
            samples[name].append((wall, parallel, size))
    out = {}
    for name, values in samples.items():
        walls, parallels, sizes = zip(*values, strict=True)
        out[name] = {
            "wall_s": list(walls),
            "median_wall_s": statistics.median(walls),
            "parallel_s": list(parallels),
            "median_parallel_s": statistics.median(parallels),
            "bytes_up_per_site": statistics.median(sizes),
        }
    return out


def _with_training(workdir: Path) -> dict[str, Any]:
    """One round with local training on the tiny Llama: plain FedAvg vs secagg."""
    from fedsilo.model.tiny import write_tiny_llama
    from fedsilo.server.app import build_server_app
    from fedsilo.simulation.engines import SimulationRequest, prepare_job
    from fedsilo.simulation.sites import SimulatedSites

    # Real training again: undo the fixed-delta stand-in of the protocol-only rounds.
    for module in (client_app, client_secagg, client_he):
        module.local_update = REAL_LOCAL_UPDATE  # type: ignore[attr-defined]
    model = write_tiny_llama(workdir / "tiny", seed=0)
    out: dict[str, Any] = {"model": "tiny random Llama (tests/conftest.py)", "sites": 3}
    for mode in ("none", "secagg", "none", "secagg"):
        config = parse_config(
            {
                "run": {"name": "bench", "rounds": 1, "require_site_policies": False},
                "model": {"base": str(model)},
                "lora": {"rank": 4, "alpha": 8.0},
                "task": {"name": "icd10", "num_sites": 3, "examples_per_site": 8, "gold_size": 6},
                "train": {"local_steps": 8, "batch_size": 2, "max_length": 96},
                "evaluation": {"max_new_tokens": 4, "batch_size": 8},
                "secure_aggregation": {"mode": mode},
            },
            source="benchmark",
        )
        run_dir = workdir / f"train-{mode}-{time.time_ns()}"

        class Quiet:
            def round_done(self, record: dict[str, Any], *, total_rounds: int) -> None: ...

            def notice(self, text: str) -> None: ...

        job = prepare_job(
            SimulationRequest(config=config, run_dir=run_dir, resume=False, reporter=Quiet())
        )
        sites = SimulatedSites(config, run_dir=run_dir, membership=job.membership)
        grid = InProcessGrid(build_client_app(sites), num_nodes=3)
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        build_server_app(job)(grid, context)
        [_, record] = RunFolder(run_dir).read_metrics()
        out.setdefault(mode, []).append(record["seconds"])
    plain, secure = min(out["none"]), min(out["secagg"])
    out["overhead_fraction"] = (secure - plain) / plain
    return out


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args(None if argv is None else list(argv))
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for sites in args.sites:
            threshold = sites // 2 + 1
            for params in args.params:
                runners: dict[str, Any] = {
                    system: _ours(
                        system, sites, params, threshold, workdir / f"{system}-{sites}-{params}"
                    )
                    for system in ("plain", "secagg", "he")
                }
                runners["flower-secagg+"] = _flower(sites, params, threshold)
                print(f"{sites} sites, {params} params ...", flush=True)
                for system, result in _measure(runners, args.repeats).items():
                    rows.append(
                        {
                            "system": system,
                            "sites": sites,
                            "params": params,
                            "threshold": threshold,
                            **result,
                        }
                    )
                    print(
                        f"  {system}: {result['median_wall_s']:.3f} s wall, "
                        f"{result['median_parallel_s']:.3f} s parallel, "
                        f"{result['bytes_up_per_site'] / 1e6:.2f} MB up per site",
                        flush=True,
                    )
        training = None if args.skip_training else _with_training(workdir)
    import flwr
    import tenseal

    payload = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "shared": True},
        "flwr": flwr.__version__,
        "tenseal": tenseal.__version__,
        # What the HE rows' decryption involves (earlier files lack it: one summed ciphertext
        # was decrypted, with no contributor agreement).
        "he_decryption": HE_DECRYPTION,
        "repeats": args.repeats,
        "rows": rows,
        "with_training": training,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
