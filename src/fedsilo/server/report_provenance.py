"""What the compliance report and the model card state about how a run was executed.

Simulation or deployment, the base model, the strategy with its server-side settings, the
compute precision and the final adapter's files, each from the ledger where it records them,
else from ``config.toml`` only when that file matches the configuration digest the ledger
records.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from fedsilo.config import FedsiloConfig, config_digest
from fedsilo.ledger import Entry, EntryKind
from fedsilo.ledger.entries import SITE_METRICS_FIELD
from fedsilo.model.base import BaseModelStatement, describe_base_model
from fedsilo.report.model import UNKNOWN_EXECUTION, Execution, Fact
from fedsilo.report.numbers import recorded_float
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.enrollment import COORDINATOR, site_folder

RunSetting = Literal["deployment", "simulation", "unknown"]
_NOT_RECORDED = "not recorded"
_NO_METRICS = "none (no site metrics are sent under secure aggregation)"
_ENGINES: Mapping[str, tuple[str, str]] = {
    "inprocess": (
        "fedsilo's in-process engine",
        "All {sites} ran inside the coordinator's own process: that process built every "
        "site's training records from the task configuration, trained each site's update and "
        "aggregated them.",
    ),
    "ray": (
        "Flower's Ray simulation engine",
        "All {sites} ran in Ray worker processes on the coordinator's machine, and the "
        "coordinator's own process also built every site's training records from the task "
        "configuration (to check data hygiene and to score the gold set).",
    ),
}


def config_digests(entries: Sequence[Entry]) -> list[object]:
    """The configuration digest of each run start and resume, in ledger order, as recorded
    (None where an entry records none)."""
    return [
        e.payload.get("config_digest")
        for e in entries
        if e.kind in (EntryKind.RUN_STARTED, EntryKind.RUN_RESUMED)
    ]


def recorded_config(config: FedsiloConfig | None, entries: Sequence[Entry]) -> FedsiloConfig | None:
    """``config`` if it is the configuration the ledger's last run start (or resume) names by
    digest, else None: a config.toml edited after the run says nothing about the run."""
    digests = config_digests(entries)
    if config is None or not digests or digests[-1] != config_digest(config):
        return None
    return config


def run_setting(config: FedsiloConfig | None, entries: Sequence[Entry]) -> RunSetting:
    """Whether the sites ran apart (a ``[deployment]`` section) or on one machine, as a
    config.toml that the ledger's configuration digest covers says."""
    recorded = recorded_config(config, entries)
    if recorded is None:
        return "unknown"
    return "deployment" if recorded.deployment is not None else "simulation"


def base_model_of(
    info: Mapping[str, object], start: Mapping[str, object], config: FedsiloConfig | None
) -> BaseModelStatement | None:
    """The base model as run.json (``info``), the run-start entry (``start``) and config.toml
    name it, None where none does. What the weights are, not only a name: the embedded
    default's name alone would invite reading it as the Hub model it derives from."""
    spec = str(info.get("base_model") or (config.model.base if config else ""))
    if not spec:
        return None
    folder = info.get("base_model_path")
    recorded = start.get("base_model_hash") or info.get("base_model_hash")
    return describe_base_model(
        spec,
        folder=Path(folder) if isinstance(folder, str) and folder else None,
        expected_hash=str(recorded) if recorded else None,
    )


def held_site_keys(folder: RunFolder, config: FedsiloConfig, sites: Sequence[str]) -> list[Path]:
    """The site private keys in the run folder, relative to it: where a simulation keeps them
    (RUN/sites/NAME/, a clustered run's RUN/keys/) or where its config pins them."""
    root = folder.root.resolve()
    pinned = config.federation.keys_dir
    found = []
    for name in sites:
        candidates = [
            site_folder(folder.root, name) / f"{name}.key",
            folder.root / "keys" / f"{name}.key",
            *([Path(pinned) / f"{name}.key"] if pinned is not None else []),
        ]
        for path in candidates:
            if root in path.resolve().parents and path.is_file():
                found.append(path.resolve().relative_to(root))
                break
    return found


def _key_caveat(
    folder: RunFolder,
    config: FedsiloConfig,
    sites: Sequence[str],
    held: Sequence[Path],
    *,
    simulated: bool,
) -> str:
    coordinator_here = (folder.root / COORDINATOR / f"{COORDINATOR}.key").is_file()
    coordinator = (
        ", next to the coordinator's (RUN/coordinator/coordinator.key): whoever holds this "
        "folder can also rewrite the ledger and sign it again"
        if coordinator_here
        else ""
    )
    if held:
        count = (
            f"all {len(sites)} sites"
            if len(held) == len(sites)
            else f"{len(held)} of the {len(sites)} sites"
        )
        # One key's path with its site's name generalised, e.g. RUN/sites/NAME/NAME.key.
        pattern = "/".join(
            "NAME" if part in sites else "NAME.key" if part.endswith(".key") else part
            for part in held[0].parts
        )
        where = (
            f"The private signing keys of {count} are in the run folder (RUN/{pattern})"
            f"{coordinator}."
        )
    elif config.federation.keys_dir is not None:
        where = (
            "The private signing keys of all sites were read from one folder, outside the run "
            f"folder (federation.keys_dir){coordinator}."
        )
    else:
        where = (
            "The simulation held the private signing keys of all sites on that machine (they "
            f"are no longer in the run folder){coordinator}."
        )
    attributed = (
        "show which simulated site each update is attributed to, not that separate parties "
        "took part"
        if simulated
        else "do not show that only that site could have signed"
    )
    return (
        f"{where} Whoever holds them can sign as any of those sites: the site signatures "
        f"verified in this report {attributed}."
    )


def execution_of(
    folder: RunFolder,
    config: FedsiloConfig | None,
    entries: Sequence[Entry],
    sites: Sequence[str],
    *,
    private: bool,
) -> Execution:
    """How the run was executed: its engine or deployment per ``config.toml``, trusted only
    where the ledger's configuration digest covers that file, and the site keys its folder
    holds. ``private`` says whether the run used differential privacy, whose bound a
    simulation leaves standing."""
    start = next((e.payload for e in entries if e.kind is EntryKind.RUN_STARTED), {})
    if start.get("kind") == "distillation":
        return Execution(
            "central",
            "at the coordinator alone: a distillation trains the master adapter on a transfer "
            "set, and no site takes part in it (the experts it distils come from runs with "
            "reports of their own)",
        )
    if config is None:
        return UNKNOWN_EXECUTION
    held = held_site_keys(folder, config, sites)
    setting = run_setting(config, entries)
    if setting == "unknown":
        return Execution(
            "unknown",
            "not established: config.toml does not match the configuration digest the ledger "
            "records",
            (
                *UNKNOWN_EXECUTION.caveats,
                *([_key_caveat(folder, config, sites, held, simulated=False)] if held else []),
            ),
        )
    if setting == "deployment":
        return Execution(
            "deployment",
            "deployment: the coordinator ran Flower's SuperLink and each site its own "
            "SuperNode (config.toml [deployment], covered by the ledger's configuration "
            "digest)",
            (_key_caveat(folder, config, sites, held, simulated=False),) if held else (),
        )
    engine, ran = _ENGINES[config.run.engine]
    still = (
        "Differential privacy still bounds what the released adapter reveals about one "
        "record (or one site) to whoever receives it: that bound does not rest on the sites "
        "being separate parties."
    )
    return Execution(
        "simulation",
        f'{engine} on one machine (config.toml [run] engine = "{config.run.engine}", no '
        "[deployment]; covered by the ledger's configuration digest)",
        (
            ran.format(sites=f"{len(sites)} sites" if sites else "sites"),
            "Nothing kept a site's records from the coordinator, so this report does not "
            "claim that raw records never left a site.",
            _key_caveat(folder, config, sites, held, simulated=True),
            *([still] if private else []),
        ),
    )


def _first_task(entries: Sequence[Entry]) -> Mapping[str, Any]:
    for entry in entries:
        task = entry.payload.get("task")
        if entry.kind is EntryKind.TASK_SENT and isinstance(task, dict):
            return task
    return {}


def strategy_fact(entries: Sequence[Entry], config: FedsiloConfig | None) -> Fact:
    """The strategy with its server-side settings as the ledger records them (FedAdam's,
    which the ledger records only by the configuration digest, from ``config`` where that
    digest covers it)."""
    start = next((e.payload for e in entries if e.kind is EntryKind.RUN_STARTED), {})
    name = start.get("strategy")
    if not isinstance(name, str) or not name:
        return Fact("Strategy", _NOT_RECORDED)
    settings: list[str] = []
    sources = ["the run-start ledger entry"]
    if name in ("fedavg", "fedprox"):
        momentum = recorded_float(start.get("server_momentum"))
        if momentum is None:
            settings.append("server momentum not recorded")
        elif momentum > 0:
            settings.append(f"server momentum {momentum:g}")
        else:
            settings.append("no server momentum")
    if name == "fedprox":
        mu = recorded_float(_first_task(entries).get("proximal_mu"))
        settings.append(f"proximal mu {mu:g}" if mu is not None else "proximal mu not recorded")
        sources.append("the tasks sent to the sites")
    if name == "fedadam":
        recorded = recorded_config(config, entries)
        if recorded is not None and recorded.strategy.name == "fedadam":
            server = recorded.strategy
            settings.append(
                f"server learning rate {server.server_learning_rate:g}, beta_1 "
                f"{server.beta_1:g}, beta_2 {server.beta_2:g}, tau {server.tau:g}"
            )
            sources.append("config.toml, which matches the ledger's configuration digest")
        else:
            settings.append("server settings not recorded")
    note = f"as recorded in {' and '.join(sources)}"
    if settings and settings[0].startswith("server momentum "):
        note += (
            "; the coordinator keeps a velocity of the rounds' mean updates and moves the "
            "global adapter by the mean plus momentum times that velocity, in Nesterov's form"
        )
    wrapped = sorted(
        {
            str(e.payload.get("strategy"))
            for e in entries
            if e.kind is EntryKind.ROUND_AGGREGATED
            and e.payload.get("strategy") not in (None, name)
        }
    )
    if wrapped:
        note += f"; the rounds' ledger entries name the aggregation {', '.join(wrapped)}"
    return Fact("Strategy", ", ".join([name, *settings]), note=note)


def precision_fact(info: Mapping[str, Any], entries: Sequence[Entry], *, simulated: bool) -> Fact:
    """The compute precision: what it is the precision of, and what the sites reported.

    ``simulated``: every site trained in the coordinator's process, so the run's setting was
    theirs too; otherwise each site chose its own and only its reports say which."""
    start = next((e.payload for e in entries if e.kind is EntryKind.RUN_STARTED), {})
    precision = info.get("precision") or start.get("precision")
    if not isinstance(precision, str):
        return Fact("Precision", _NOT_RECORDED)
    where = (
        "local training at every simulated site and the coordinator's gold evaluation"
        if simulated
        else "the coordinator's gold evaluation (each deployed site chooses its own, as it "
        "reports with its updates)"
    )
    if precision == "bf16":
        note = (
            f"the precision of the frozen base weights, held in bf16 during {where}; the LoRA "
            "adapters, their gradients, the optimizer state and every update sent are fp32"
        )
    else:
        note = f"every weight in {precision} during {where}"
    return Fact("Precision", precision, note=f"{note}; {_site_precisions(entries)}")


def _site_precisions(entries: Sequence[Entry]) -> str:
    reported: Counter[str] = Counter()
    for entry in entries:
        if entry.kind is not EntryKind.UPDATE_RECEIVED:
            continue
        if SITE_METRICS_FIELD not in entry.payload:
            reported["nothing recorded"] += 1  # ledgers from before sites signed their metrics
            continue
        metrics = entry.payload[SITE_METRICS_FIELD]
        value = metrics.get("precision") if isinstance(metrics, dict) else None
        # Under secure aggregation a site sends no metrics at all; its entry holds None.
        reported[value if isinstance(value, str) else _NO_METRICS] += 1
    total = sum(reported.values())
    if not total:
        return "no accepted update records a site's precision"
    if len(reported) == 1 and _NO_METRICS not in reported:
        return f"the sites reported {next(iter(reported))} with all {total} accepted updates"
    said = [f"{value} with {count}" for value, count in sorted(reported.items())]
    return f"of the {total} accepted updates, the sites reported {'; '.join(said)}"


def final_adapter_facts(finished: Entry | None) -> list[Fact]:
    """The released adapter files by the hashes the ledger records (a clustered run's expert
    weights), and the last aggregate's digest labelled as the checkpoint hash it is (no file in
    final/ has it)."""
    if finished is None:
        return [Fact("Final adapter", "none: the run did not finish")]
    payload = finished.payload
    recorded = payload.get("final_files")
    experts = payload.get("experts")
    where = f"hash of the file, as the ledger's run_finished entry {finished.seq} records it"
    facts: list[Fact] = []
    if isinstance(recorded, dict):
        facts += [
            Fact(
                f"final/{name} sha256",
                str(digest),
                True,
                f"{where}; fedsilo audit verify checks final/ against it",
            )
            for name, digest in sorted(recorded.items())
        ]
    elif isinstance(experts, dict):
        facts += [
            Fact(f"experts/{name}/adapter_model.safetensors sha256", str(digest), True, where)
            for name, digest in sorted(experts.items())
        ]
    elif "final_adapter_sha256" in payload:
        facts.append(
            Fact(
                "final/adapter_model.safetensors sha256",
                "not recorded in the ledger",
                note="a ledger written before file hashes were recorded: fedsilo audit verify "
                "compares the file's tensors with the last aggregate instead",
            )
        )
    else:
        facts.append(Fact("Final adapter", "not recorded in the ledger"))
    if "final_adapter_sha256" not in payload:
        return facts
    rounds = payload.get("rounds")
    digest = str(payload.get("final_adapter_sha256"))
    tail = "recorded in the same entry; not the hash of any file in final/"
    if isinstance(rounds, int):
        facts.append(
            Fact(
                f"Checkpoint adapter sha256 (round {rounds})",
                digest,
                True,
                f"the final adapter's tensors as checkpoints/round-{rounds}/adapter.safetensors "
                f"stores them, {tail}",
            )
        )
    else:
        facts.append(
            Fact(
                "Adapter tensors sha256",
                digest,
                True,
                f"the final adapter's tensors serialized as a checkpoint stores them, {tail}",
            )
        )
    return facts


def recorded_he_tensors(start: Mapping[str, object]) -> tuple[str, ...] | None:
    """The HE tensor selection the run_started entry records (empty: all), None if it does
    not record one."""
    recorded = start.get("he_tensors")
    if isinstance(recorded, list) and all(isinstance(name, str) for name in recorded):
        return tuple(recorded)
    return None
