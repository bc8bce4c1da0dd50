"""The `fedsilo` command: parse arguments, load the config, call the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fedsilo.cli.deploy import add_deploy_commands
from fedsilo.config import ConfigError, FedsiloConfig, load_config, parse_config

if TYPE_CHECKING:
    from fedsilo.crypto import PublicKey
    from fedsilo.ledger import VerifyReport
    from fedsilo.server.run_folder import RunFolder


def _demo_config(rounds: int | None) -> FedsiloConfig:
    import tomllib

    text = resources.files("fedsilo.configs").joinpath("demo.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    if rounds is not None:
        data["run"]["rounds"] = rounds
    return parse_config(data, source="fedsilo/configs/demo.toml")


def _run(config: FedsiloConfig, *, out: Path, resume: bool) -> int:
    from fedsilo.cli.progress import ConsoleReporter
    from fedsilo.data.tasks import task_metric
    from fedsilo.evaluation.metrics import METRIC_SCORES
    from fedsilo.model.base import DEFAULT_BASE_MODEL, cache_root, is_default_model_cached
    from fedsilo.server.run_folder import RunFolder
    from fedsilo.simulation.engines import SimulationRequest, simulate

    metric = task_metric(config.task)
    reporter = ConsoleReporter(metric=metric)
    if config.model.base == DEFAULT_BASE_MODEL and not is_default_model_cached():
        reporter.console.print(
            "first use of the embedded SmolLM2-135M-Instruct: converting its GGUF file to a "
            f"cached safetensors folder in {cache_root()} (about 30 s, once)"
        )
    reporter.console.print(
        f"run [bold]{config.run.name}[/]: {config.num_sites} sites, {config.run.rounds} rounds, "
        f"strategy {config.strategy.name}, engine {config.run.engine}, base model "
        f"{config.model.base} -> {out}"
    )
    reporter.console.print(f"gold-set metric: {metric} ({METRIC_SCORES[metric][0]})")
    with reporter.training_progress():
        simulate(SimulationRequest(config=config, run_dir=out, resume=resume, reporter=reporter))
    if config.clusters.method != "none":
        for expert in sorted((out / "experts").iterdir()):
            reporter.console.print(f"expert {expert.name}: {expert}")
        return 0
    reporter.summary(RunFolder(out).read_metrics())
    reporter.console.print(f"final adapter: {RunFolder(out).final_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    return _run(_demo_config(args.rounds), out=out, resume=False)


def cmd_simulate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.resume is not None:
        if args.out is not None and args.out != args.resume:
            raise ConfigError("--out and --resume name different folders; give only --resume")
        return _run(config, out=args.resume, resume=True)
    out = args.out or Path("runs") / time.strftime(f"{config.run.name}-%Y%m%d-%H%M%S")
    return _run(config, out=out, resume=False)


def cmd_export(args: argparse.Namespace) -> int:
    from fedsilo.server.outputs import export_run

    source = export_run(args.run, args.out)
    print(f"wrote PEFT adapter folder {args.out} (from {source})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fedsilo.server.outputs import generate_from_run

    print(generate_from_run(args.run, args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    from fedsilo.crypto import fingerprint, init_site_keys, read_public_key
    from fedsilo.crypto.keys import read_passphrase

    passphrase = None
    if args.passphrase_file is not None:
        passphrase = read_passphrase(args.passphrase_file, source=f"site {args.site}")
    private, public = init_site_keys(args.site, args.out, passphrase=passphrase)
    print(f"private key: {private} (mode 0600{', passphrase-encrypted' if passphrase else ''})")
    print(f"public key:  {public}")
    print(f"fingerprint: {fingerprint(read_public_key(public))}")
    print("give the public key (not the private one) to the federation coordinator to enroll")
    return 0


def _trusted_key(args: argparse.Namespace) -> PublicKey | None:
    from fedsilo.crypto import read_public_key

    return read_public_key(args.coordinator_key) if args.coordinator_key else None


def _trusted_site_keys(args: argparse.Namespace) -> dict[str, PublicKey] | None:
    from fedsilo.server.audit import read_site_keys

    return read_site_keys(args.site_keys) if args.site_keys else None


def _print_verification(report: VerifyReport) -> None:
    from fedsilo.server.audit import describe

    print(describe(report))
    for problem in report.problems:
        where = f"entry {problem.seq}" if problem.seq is not None else "run folder"
        print(f"  {where}: {problem.reason}")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from fedsilo.server.audit import verify_run

    if args.coordinator_key is None:
        print(
            "note: trusting the coordinator key pinned in the run folder; pass "
            "--coordinator-key FILE to check against a key you obtained yourself"
        )
    if args.site_keys is None:
        print(
            "note: trusting the site keys pinned in the run folder (checked against the ledger's "
            "run_started entry); pass --site-keys DIR to check against keys you obtained yourself"
        )
    report = verify_run(
        args.run, coordinator_key=_trusted_key(args), site_keys=_trusted_site_keys(args)
    )
    _print_verification(report)
    return 0 if report.ok else 1


def cmd_audit_report(args: argparse.Namespace) -> int:
    from fedsilo.report import write_pdf, write_report
    from fedsilo.report.model import KeySource
    from fedsilo.server.audit import describe, verify_run
    from fedsilo.server.report_data import build_report_data

    report = verify_run(
        args.run, coordinator_key=_trusted_key(args), site_keys=_trusted_site_keys(args)
    )
    key_source: KeySource = "folder" if args.coordinator_key is None else "auditor"
    site_key_source: KeySource = "folder" if args.site_keys is None else "auditor"
    data = build_report_data(
        args.run, report, key_source=key_source, site_key_source=site_key_source
    )
    write_report(data, args.out)
    print(f"wrote {args.out}; {describe(report)}")
    if args.pdf:
        pdf = args.out.with_suffix(".pdf")
        write_pdf(args.out, pdf)
        print(f"wrote {pdf}")
    if key_source == "folder":
        print("warning: checked against the coordinator key in the run folder, not a pinned one")
    if data.outcome.status != "completed":
        print(
            f"run outcome: {data.outcome.status}"
            + (f" ({data.outcome.reason})" if data.outcome.reason else "")
        )
    return 0 if report.ok else 1


def _run_status(folder: RunFolder) -> str:
    """The run's status.json state ("running", "completed", "failed"), or "unknown"."""
    try:
        status = folder.read_json(folder.status_path).get("status")
    except (OSError, ValueError):
        return "unknown"
    return status if status in ("completed", "failed", "running") else "unknown"


def cmd_privacy(args: argparse.Namespace) -> int:
    from fedsilo.ledger import read_entries
    from fedsilo.report.reader_text import EPSILON_OF_ACCEPTED_UPDATES_ONLY
    from fedsilo.server.audit import verify_run
    from fedsilo.server.privacy_report import (
        entries_through_round,
        site_epsilons,
        site_events,
        site_level_epsilon,
    )
    from fedsilo.server.report_data import run_files
    from fedsilo.server.report_privacy import dp_settings
    from fedsilo.server.run_folder import RunFolder

    folder = RunFolder(args.run)
    # The DP events are the sites' signed claims and the site-level events the coordinator's:
    # an epsilon composed from entries that fail verification would state a guarantee nobody
    # can stand behind, so it is not computed at all.
    report = verify_run(
        args.run, coordinator_key=_trusted_key(args), site_keys=_trusted_site_keys(args)
    )
    if not report.ok:
        _print_verification(report)
        print(f"{folder.root}: epsilon not recomputed, the ledger does not verify")
        return 1
    if args.coordinator_key is None:
        print("ledger verified against the coordinator key pinned in the run folder")
    else:
        print(f"ledger verified against {args.coordinator_key}")
    entries = read_entries(folder.ledger_path)
    # The accountant and delta of a config.toml edited after the run would give another
    # epsilon: only the configuration the ledger records (or its own record) is used.
    privacy = dp_settings(run_files(folder)[0], entries)
    if privacy is None:
        print(
            f"{folder.root}: the run's DP settings are not established (config.toml is missing "
            "or is not the configuration whose digest the ledger records, and the ledger does "
            "not record them); epsilon not recomputed"
        )
        return 1
    if not (privacy.record_level or privacy.site_level):
        print(f"{folder.root}: no differential privacy configured; no epsilon bounds this run")
        return 1
    print(f"DP settings from {privacy.source}")
    all_match = True
    if privacy.site_level:
        claims = [
            (m["round"], m["site_level_epsilon"])
            for m in folder.read_metrics()
            if "site_level_epsilon" in m
        ]
        claim_round, claim = claims[-1] if claims else (None, None)
        # As for record-level DP below: the claim is checked against the ledger as it stood
        # when it was written, not against a round aggregated after it (a crash before the
        # round's metrics line, or a run still going).
        through = entries if claim_round is None else entries_through_round(entries, claim_round)
        site_level = site_level_epsilon(through, delta=privacy.delta, accountant=privacy.accountant)
        all_match = claim is not None and abs(claim - site_level) <= 1e-9 * max(1.0, site_level)
        print(
            f"site-level epsilon of the global adapter at delta={privacy.delta:g}: "
            f"{site_level:.4f} recomputed"
            + ("" if claim_round is None else f" through round {claim_round}, the last reported")
            + f", {'-' if claim is None else claim} reported"
        )
    if not privacy.record_level:
        return 0 if all_match else 1
    with_epsilon = [(m["round"], m["epsilon"]) for m in folder.read_metrics() if "epsilon" in m]
    last_round, reported = with_epsilon[-1] if with_epsilon else (None, {})
    # The reported figures are checked against the ledger as it stood when they were written;
    # updates ledgered since (a round under way, or one the run never finished) come after.
    covered = entries if last_round is None else entries_through_round(entries, last_round)
    events = site_events(covered)
    recomputed = site_epsilons(covered, delta=privacy.delta, accountant=privacy.accountant)
    print(
        f"epsilon per site at delta={privacy.delta:g} ({privacy.accountant} accountant), "
        "recomputed from the DP events in the ledger"
        + ("" if last_round is None else f" through round {last_round}, the last reported")
    )
    print(f"{'site':<32} {'events':>6} {'epsilon':>10} {'reported':>10}  match")
    for site, epsilon in recomputed.items():
        stated = reported.get(site)
        match = stated is not None and abs(stated - epsilon) <= 1e-9 * max(1.0, epsilon)
        all_match &= match
        shown = "-" if stated is None else f"{stated:.4f}"
        verdict = "yes" if match else "NO"
        print(f"{site:<32} {len(events[site]):>6} {epsilon:>10.4f} {shown:>10}  {verdict}")
    if len(covered) < len(entries):
        status = _run_status(folder)
        print(
            f"after round {last_round} (run status: {status}) the ledger holds more updates, "
            "in no reported figure yet; epsilon spent with them:"
        )
        later_events = site_events(entries)
        for site, epsilon in site_epsilons(
            entries, delta=privacy.delta, accountant=privacy.accountant
        ).items():
            extra = len(later_events[site]) - len(events.get(site, []))
            if extra:
                print(f"{site:<32} {len(later_events[site]):>6} {epsilon:>10.4f}  (+{extra})")
    print(EPSILON_OF_ACCEPTED_UPDATES_ONLY.replace("\u03b5", "epsilon"))
    return 0 if all_match else 1


def cmd_transfer_set(args: argparse.Namespace) -> int:
    from fedsilo.distill.transfer import build_transfer_for_run, write_transfer

    records = build_transfer_for_run(args.run, per_expert=args.per_expert, seed=args.seed)
    write_transfer(records, args.out)
    experts = sorted({record.expert or "" for record in records})
    print(f"wrote {len(records)} public transfer records for experts {experts} to {args.out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from fedsilo.distill.run import DistillSettings, distill

    torch.set_num_threads(args.threads)
    settings = DistillSettings(
        temperature=args.temperature,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        seed=args.seed,
        router=args.router,
    )
    result = distill(
        args.experts,
        args.transfer,
        args.out,
        settings=settings,
        base=args.base,
        system_prompt=args.system_prompt,
        coordinator_key=args.coordinator_key,
    )
    routed = ", ".join(f"{name}: {count}" for name, count in sorted(result.routed.items()))
    print(
        f"distilled {len(result.experts)} experts into {args.out / 'final'} "
        f"(transfer examples per expert: {routed}); distillation loss "
        f"{result.kl_before:.4f} -> {result.kl_after:.4f}; provenance in {args.out / 'ledger.db'}, "
        f"signed with {result.coordinator_key}"
    )
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from fedsilo.bench.quality import QualityRequest, run_quality_benchmark
    from fedsilo.bench.settings import ALL_ALGORITHMS, QualityBudget
    from fedsilo.bench.summary import (
        seed_family_base,
        seed_in_name,
        seed_results_files,
        seed_results_path,
        summary_label,
        update_summary,
    )
    from fedsilo.bench.sweep import (
        SweepRequest,
        chosen_budget,
        hyperparameters_record,
        run_sweep,
    )

    defaults = QualityBudget()
    seeds: list[int] = args.seeds or [args.seed]
    budget = QualityBudget(
        num_sites=args.sites,
        rounds=args.rounds,
        local_steps=args.local_steps,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        server_momentum=args.server_momentum,
        server_learning_rate=args.server_learning_rate,
        lr_schedule=args.lr_schedule,
        warmup_rounds=args.warmup_rounds,
        examples_per_site=_examples_per_site(args.examples_per_site),
        gold_size=args.gold_size,
        gold_phrasings=args.gold_phrasings,
        gold_ranking_candidates=args.gold_ranking_candidates,
        train_on_inclusion_terms=args.train_on_inclusion_terms,
        validation_share=args.validation_share,
        gold_every_rounds=args.gold_every_rounds,
        lora_rank=args.lora_rank,
        proximal_mus=tuple(args.mu) if args.mu else defaults.proximal_mus,
        seed=seeds[0],
    )
    algorithms = tuple(args.algorithms.split(",")) if args.algorithms else ALL_ALGORITHMS
    base = args.results or Path("benchmarks") / "results" / f"quality-{args.task}.json"
    if args.seeds and seed_family_base(base) != base:
        # Seed s would write BASE-seed<s>.json next to a file that is itself a later seed's.
        print(
            f"fedsilo bench quality: --results {base} names one seed's file; with --seeds give "
            f"the seed-0 file ({seed_family_base(base)}), or run one seed with --seed",
            file=sys.stderr,
        )
        return 2
    named_seed = seed_in_name(base)
    if not args.seeds and named_seed is not None and named_seed != args.seed:
        print(
            f"fedsilo bench quality: --results {base} is seed {named_seed}'s file, but --seed "
            f"is {args.seed}",
            file=sys.stderr,
        )
        return 2
    stamp = time.strftime(f"quality-{args.task}-%Y%m%d-%H%M%S")
    say = lambda line: print(line, flush=True)  # noqa: E731

    def out_dir(results: Path, leaf: str) -> Path:
        if args.out:
            return Path(args.out) / leaf if leaf else Path(args.out)
        recorded = _recorded_out_dir(results) if args.resume else None
        return recorded or Path("runs") / stamp / leaf

    hyperparameters = None
    swept = tuple(args.sweep_algorithms.split(",")) if args.sweep_algorithms else algorithms
    if args.sweep:
        sweep_path = base.with_name(f"{base.stem}-sweep{base.suffix}")
        sweep_seed = seeds[0] if args.sweep_seed is None else args.sweep_seed
        sweep = run_sweep(
            SweepRequest(
                quality=QualityRequest(
                    task=args.task,
                    model=args.model,
                    out_dir=out_dir(sweep_path, "sweep-runs"),
                    results_path=sweep_path,
                    budget=dataclasses.replace(budget, seed=sweep_seed),
                    algorithms=swept,
                    resume=args.resume,
                    say=say,
                    device=args.device,
                ),
                learning_rates=tuple(args.lr_grid or (budget.learning_rate,)),
                proximal_mus=budget.proximal_mus if "fedprox" in swept else (),
                server_learning_rates=tuple(args.server_lr_grid or ())
                if "fedadam" in swept
                else (),
            )
        )
        budget = chosen_budget(budget, sweep)
        hyperparameters = hyperparameters_record(sweep, sweep_path)
    written: list[Path] = []
    # The summary's entry: the name of the seed-0 file of the results file's seeds (the task's,
    # unless --results names another setting of it, such as a many-local-steps run), so that a
    # later seed run alone (--results quality-T-seed2.json --seed 2) joins T's entry.
    family = seed_family_base(base)
    label = summary_label(family)
    for seed in seeds:
        # Each seed has its own file, so that no seed's results replace another's.
        results = seed_results_path(family, seed)
        run_quality_benchmark(
            QualityRequest(
                task=args.task,
                model=args.model,
                out_dir=out_dir(results, f"seed{seed}" if args.seeds else ""),
                results_path=results,
                budget=dataclasses.replace(budget, seed=seed),
                algorithms=algorithms,
                edge_cases=not args.no_edge_cases,
                resume=args.resume,
                say=say,
                hyperparameters=hyperparameters,
                device=args.device,
                command=args.command_line,
            )
        )
        written.append(results)
        others = [p for p in seed_results_files(family) if p not in written]
        summary = update_summary(args.summary, label, [*written, *others])
        skipped = summary["tasks"][label]["skipped_files"]
        print(
            f"wrote {args.summary} ({label}: seeds "
            f"{[int(s) for s in sorted({*seeds[: len(written)]})]} measured now"
            + (
                f"; left out files of another budget or of a seed given twice: {skipped})"
                if skipped
                else ")"
            ),
            flush=True,
        )
    return 0


def cmd_bench_merge(args: argparse.Namespace) -> int:
    from fedsilo.bench.merge import MergeError, merge_quality_results
    from fedsilo.bench.summary import (
        drop_summary_entries,
        seed_family_base,
        seed_results_files,
        summary_label,
        update_summary,
    )

    try:
        merged = merge_quality_results(args.into, args.sources, other_cpu=args.other_cpu)
    except MergeError as error:
        print(f"fedsilo bench merge: {error}", file=sys.stderr)
        return 2
    # The summary's entry is named after the seed-0 file of INTO's seed family.
    base = seed_family_base(args.into)
    label = summary_label(base)
    update_summary(args.summary, label, seed_results_files(base))
    # A part folded in is no longer a benchmark of its own: its run wrote an entry for it.
    dropped = drop_summary_entries(args.summary, args.sources)
    print(
        f"wrote {args.into}: algorithms {sorted(merged['algorithms'])}"
        f"{'' if merged['complete'] else ' (some parts incomplete)'}; summary {args.summary}"
        f" ({label}{f'; dropped entries of the parts: {dropped}' if dropped else ''})"
    )
    return 0


def _examples_per_site(value: str) -> int | Literal["all"]:
    if value == "all":
        return "all"
    problem = f"--examples-per-site: a positive number or 'all', got {value!r}"
    try:
        count = int(value)
    except ValueError:
        raise SystemExit(problem) from None
    if count < 1:
        raise SystemExit(problem)
    return count


def _recorded_out_dir(results: Path) -> Path | None:
    """The run folder a results file was measured in (what --resume goes on in)."""
    try:
        recorded = json.loads(results.read_text()).get("out_dir")
    except (OSError, json.JSONDecodeError):
        return None
    return Path(recorded) if recorded else None


def _add_bench(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fedsilo.bench.settings import TASK_PRESETS, QualityBudget

    defaults = QualityBudget()
    bench = commands.add_parser("bench", help="quality benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    quality = bench.add_parser(
        "quality", help="federated vs centralized vs local-only training on one task"
    )
    quality.add_argument("--task", required=True, choices=sorted(TASK_PRESETS))
    quality.add_argument("--model", default="smollm2-135m-instruct", help="base model")
    quality.add_argument("--out", type=Path, help="folder for the runs (default: runs/...)")
    quality.add_argument(
        "--results", type=Path, help="results JSON (default: benchmarks/results/quality-T.json)"
    )
    quality.add_argument(
        "--algorithms",
        help="comma-separated subset of centralized,local,fedavg,fedprox,"
        "fedadam,ffa-lora (default: all)",
    )
    quality.add_argument(
        "--mu",
        type=float,
        nargs="+",
        action="extend",
        help=f"FedProx mu grid (default {' '.join(f'{m:g}' for m in defaults.proximal_mus)}; "
        "with --sweep the benchmark runs the mu the sweep chose)",
    )
    quality.add_argument("--no-edge-cases", action="store_true", help="skip the ICD-10 edge cases")
    quality.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where every algorithm trains and is scored (train.device; default cpu)",
    )
    quality.add_argument(
        "--resume",
        action="store_true",
        help="keep the algorithms the results file already holds (same task, model and budget) "
        "and run the rest; a federation that stopped midway goes on from its last checkpoint "
        "(default --out: the folder the results file names); with --sweep, also the sweep",
    )
    quality.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run (or, with --resume, go on with) each seed: results quality-T.json for seed 0 "
        "and quality-T-seedS.json for the others, runs under --out/seedS",
    )
    quality.add_argument(
        "--summary",
        type=Path,
        default=Path("benchmarks") / "results" / "quality-summary.json",
        help="the summary over seeds (mean, 95%% t-interval, ratio to centralized), one entry "
        "per results file name (quality-T.json: T)",
    )
    quality.add_argument(
        "--sweep",
        action="store_true",
        help="first choose each algorithm's learning rate from --lr-grid (and FedProx's mu from "
        "--mu) by loss on the validation split (first seed; results in quality-T-sweep.json), "
        "then run the seeds with the choice",
    )
    quality.add_argument("--lr-grid", type=float, nargs="+", help="learning rates the sweep tries")
    quality.add_argument(
        "--server-lr-grid",
        type=float,
        nargs="+",
        help="FedAdam server learning rates the sweep tries, at FedAvg's chosen learning rate "
        "(without it, FedAdam's site learning rate is swept at --server-learning-rate)",
    )
    quality.add_argument(
        "--sweep-seed",
        type=int,
        help="the seed the sweep runs on (default: the first of --seeds); with --resume, "
        "lets each seed run in its own process on one finished sweep",
    )
    quality.add_argument(
        "--sweep-algorithms",
        help="comma-separated algorithms the sweep tunes (default: --algorithms); the others "
        "train at --learning-rate",
    )
    quality.add_argument(
        "--examples-per-site",
        default=str(defaults.examples_per_site),
        help="records per site, or 'all' of each site's share "
        f"(default {defaults.examples_per_site})",
    )
    quality.add_argument(
        "--local-epochs",
        type=float,
        help="local work per round in passes over each site's records (instead of --local-steps)",
    )
    quality.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=defaults.lr_schedule,
        help="learning rate across rounds, the same for every algorithm (default constant)",
    )
    quality.add_argument(
        "--train-on-inclusion-terms",
        action="store_true",
        help="ICD-10: sites also train on their codes' inclusion terms (never gold phrasings)",
    )
    for flag, field_name, kind in (
        ("sites", "num_sites", int),
        ("rounds", "rounds", int),
        ("local-steps", "local_steps", int),
        ("batch-size", "batch_size", int),
        ("learning-rate", "learning_rate", float),
        ("server-momentum", "server_momentum", float),
        ("server-learning-rate", "server_learning_rate", float),
        ("warmup-rounds", "warmup_rounds", int),
        ("gold-size", "gold_size", int),
        ("gold-phrasings", "gold_phrasings", int),
        ("gold-ranking-candidates", "gold_ranking_candidates", int),
        ("validation-share", "validation_share", float),
        ("gold-every-rounds", "gold_every_rounds", int),
        ("lora-rank", "lora_rank", int),
        ("seed", "seed", int),
    ):
        default = getattr(defaults, field_name)
        quality.add_argument(f"--{flag}", type=kind, default=default, help=f"default {default}")
    quality.set_defaults(handler=cmd_bench_quality)
    merge = bench.add_parser(
        "merge",
        help="fold quality results files that measured parts of one benchmark into one",
        description="Add the algorithms of each SOURCE results file to INTO, after checking that "
        "all measured the same benchmark (task, model, budget, data, gold set); then recompute "
        "INTO's goals and its entry of the summary. Lets two processes, one per core, measure "
        "different algorithms of one benchmark, each writing its own --results.",
    )
    merge.add_argument("into", type=Path, help="the results file that receives the algorithms")
    merge.add_argument("sources", type=Path, nargs="+", help="results files to add to it")
    merge.add_argument(
        "--other-cpu",
        action="store_true",
        help="the parts ran on different CPUs, whose bf16 kernels score the untrained adapter "
        "slightly differently: merge them anyway, keeping each part's untrained score",
    )
    merge.add_argument(
        "--summary",
        type=Path,
        default=Path("benchmarks") / "results" / "quality-summary.json",
        help="the summary over seeds whose entry for INTO is recomputed",
    )
    merge.set_defaults(handler=cmd_bench_merge)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsilo", description="Federated LoRA fine-tuning across data silos, on Flower."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="4 hospitals learn ICD-10-CM coding on SmolLM2")
    demo.add_argument("--out", type=Path, help="run folder (default: runs/demo-TIMESTAMP)")
    demo.add_argument("--rounds", type=int, help="number of rounds (default: the demo's 28)")
    demo.set_defaults(handler=cmd_demo)

    simulate = commands.add_parser("simulate", help="run a federation from a TOML config")
    simulate.add_argument("config", type=Path)
    simulate.add_argument("--out", type=Path, help="run folder (default: runs/NAME-TIMESTAMP)")
    simulate.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run")
    simulate.set_defaults(handler=cmd_simulate)

    export = commands.add_parser("export", help="write a run's adapter as a PEFT folder")
    export.add_argument("run", type=Path)
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(handler=cmd_export)

    generate = commands.add_parser("generate", help="answer a prompt with a run's model")
    generate.add_argument("run", type=Path)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.set_defaults(handler=cmd_generate)

    privacy = commands.add_parser("privacy", help="recompute each site's epsilon from the ledger")
    privacy.add_argument("run", type=Path)
    privacy.add_argument(
        "--coordinator-key",
        type=Path,
        help="verify the ledger against this coordinator public key (default: the run's)",
    )
    _add_site_keys_option(privacy)
    privacy.set_defaults(handler=cmd_privacy)

    transfer = commands.add_parser(
        "transfer-set", help="public ICD-10-CM transfer records for a clustered run's experts"
    )
    transfer.add_argument("run", type=Path, help="a clustered run folder (with experts/)")
    transfer.add_argument("--per-expert", type=int, default=64)
    transfer.add_argument("--seed", type=int, default=0)
    transfer.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    transfer.set_defaults(handler=cmd_transfer_set)

    dist = commands.add_parser("distill", help="distill expert adapters into one master adapter")
    dist.add_argument("--experts", type=Path, required=True, help="folder of expert adapters")
    dist.add_argument("--transfer", type=Path, required=True, help="transfer set (JSONL)")
    dist.add_argument("--out", type=Path, required=True, help="output folder")
    dist.add_argument("--temperature", type=float, default=2.0)
    dist.add_argument("--steps", type=int, default=64)
    dist.add_argument("--batch-size", type=int, default=4)
    dist.add_argument("--learning-rate", type=float, default=1e-3)
    dist.add_argument("--max-length", type=int, default=96)
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--router", choices=["label", "best-expert"], default="label")
    dist.add_argument("--base", help="base model (default: the one the experts name)")
    dist.add_argument("--system-prompt", help="default: the one the experts were trained with")
    dist.add_argument("--coordinator-key", type=Path, help="signs the ledger (default: the run's)")
    dist.add_argument("--threads", type=int, default=1, help="torch threads")
    dist.set_defaults(handler=cmd_distill)

    keys = commands.add_parser("keys", help="site identity keys").add_subparsers(
        dest="keys_command", required=True
    )
    keys_init = keys.add_parser("init", help="create a site's Ed25519 key pair")
    keys_init.add_argument("--site", required=True, help="the site's name in the federation")
    keys_init.add_argument("--out", type=Path, required=True, help="folder for NAME.key/NAME.pub")
    keys_init.add_argument(
        "--passphrase-file", type=Path, help="encrypt the private key with this file's content"
    )
    keys_init.set_defaults(handler=cmd_keys_init)

    audit = commands.add_parser("audit", help="verify a run's ledger offline").add_subparsers(
        dest="audit_command", required=True
    )
    for name, handler, help_text in (
        ("verify", cmd_audit_verify, "check the ledger's chain, signatures and checkpoints"),
        ("report", cmd_audit_report, "write a self-contained HTML compliance report"),
    ):
        command = audit.add_parser(name, help=help_text)
        command.add_argument("run", type=Path)
        command.add_argument(
            "--coordinator-key", type=Path, help="the coordinator's public key file you trust"
        )
        _add_site_keys_option(command)
        if name == "report":
            command.add_argument("--out", type=Path, required=True)
            command.add_argument(
                "--pdf", action="store_true", help="also print it to OUT.pdf (headless Chromium)"
            )
        command.set_defaults(handler=handler)
    _add_bench(commands)
    add_deploy_commands(commands)
    return parser


def _add_site_keys_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--site-keys",
        type=Path,
        help="a folder of the site public keys you trust, NAME.pub per site (default: the "
        "keys pinned in the run's federation.json)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedsilo` command."""
    args = _parser().parse_args(argv)
    args.command_line = shlex.join(["fedsilo", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    from transformers.utils import logging as transformers_logging

    from fedsilo.model.base import ModelError

    # Per-load progress bars would drown the one line per round that matters, and so would
    # dp-accounting's notices about RDP orders it drops (dropping an order only makes the
    # epsilon bound more conservative).
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    logging.getLogger("absl").setLevel(logging.ERROR)

    try:
        return handler(args)
    except (ConfigError, ModelError, OSError, ValueError, RuntimeError) as error:
        # KeyFileError, MembershipError, DataError, ProtocolError and LedgerError derive from
        # ValueError or RuntimeError: each names its file or field.
        print(f"fedsilo {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
