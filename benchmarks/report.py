"""Render docs/benchmarks.md from the JSON files in benchmarks/results.

    python benchmarks/report.py

Every number in the page comes from a results file written by a benchmark script.
"""

from __future__ import annotations

import json
import statistics
import tomllib
from pathlib import Path
from typing import Any

from quality_report import quality_sections, scale_section
from report_deployment import deployment_section
from report_distill import distill_section
from report_privacy import (
    attack_section,
    fill_compliance_page,
    signal_section,
    sweep_section,
    utility_section,
)
from report_secagg import secagg_section
from report_site_dp import fill_compliance_site_table, site_dp_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
# Written by throughput.py on a CPU that lacks native bf16, so both kinds of CPU stay on the page.
NO_NATIVE_BF16_THROUGHPUT = "throughput-no-native-bf16.json"
DEMO_NO_NATIVE_BF16 = "demo-no-native-bf16.json"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _pct(value: float | None) -> str:
    if value is None:
        return "-"  # not measured (a demo round after which the gold set was not scored)
    return f"{100 * value:.2f}%" if value < 0.01 else f"{100 * value:.1f}%"


_LOOP_NAMES = {
    "bare-fp32": "bare torch + peft, fp32",
    "bare-bf16": "bare torch + peft, bf16 base weights + autocast",
    "hf-trainer-bf16": "Hugging Face `Trainer` + peft, `bf16=True`",
    "hf-trainer-fp32": "Hugging Face `Trainer` + peft, `bf16=False`",
    "fedsilo-plain-fp32": "fedsilo `train_plain`, fp32",
    "fedsilo-plain-eager": "fedsilo `train_plain`, `precision = auto`, `compile = off`",
    "fedsilo-plain": "fedsilo `train_plain`, `precision = auto`",
    "fedsilo-dp": "fedsilo DP-SGD (`train_local_dp`), `precision = auto`",
}


def _throughput_goals(
    rows: list[dict[str, Any]],
    *,
    native_bf16: bool,
    one_thread_peaks: dict[str, float] | None = None,
) -> list[str]:
    """The trainer's goals read off the rows, one line per thread count, met or not.

    Where the CPU has native bf16 the goals are >= 2.5x the bare fp32 loop and >= 1.3x the
    `Trainer` with `bf16=True`, and bf16 must hold site memory to 60% of fp32's. Where it has
    not, `precision = auto` trains in fp32, the speed-up can only come from the FLOPs removed,
    and the goal is >= 1.15x the faster of the `Trainer` rows (its bf16 is emulated there).
    """

    def verdict(value: float, goal: float, *, at_most: bool = False) -> str:
        met = value <= goal if at_most else value >= goal
        return "met" if met else "not met"

    lines = []
    for threads in sorted({row["threads"] for row in rows}):
        by_loop = {row["loop"]: row for row in rows if row["threads"] == threads}
        trainers = [
            by_loop[loop] for loop in ("hf-trainer-bf16", "hf-trainer-fp32") if loop in by_loop
        ]
        if native_bf16:
            trainers = [row for row in trainers if row["loop"] == "hf-trainer-bf16"]
        # Without native bf16, `auto` is fp32: the fedsilo-plain row is the fp32 loop.
        fp32_loop = "fedsilo-plain-fp32" if native_bf16 else "fedsilo-plain"
        needed = ("bare-fp32", "fedsilo-plain", fp32_loop)
        if not trainers or not all(loop in by_loop for loop in needed):
            continue
        plain = by_loop["fedsilo-plain"]
        speed = plain["tokens_per_s"]
        vs_bare = speed / by_loop["bare-fp32"]["tokens_per_s"]
        trainer = max(trainers, key=lambda row: float(row["tokens_per_s"]))
        vs_trainer = speed / trainer["tokens_per_s"]
        trainer_goal = 1.3 if native_bf16 else 1.15
        # The GEMM probe reads lower in some processes than others; the goal is read against
        # the highest one, the machine's peak as best measured.
        probes = [
            float(row["gemm_peak_gflops"])
            for row in by_loop.values()
            if row.get("precision") == plain.get("precision") and "gemm_peak_gflops" in row
        ]
        if threads == 1 and one_thread_peaks and plain.get("precision") in one_thread_peaks:
            probes.append(float(one_thread_peaks[plain["precision"]]))  # the parent's probe
        peak = max(probes)
        share = plain["share_of_peak"] * plain["gemm_peak_gflops"] / peak
        trainer_name = "`bf16=True`" if trainer["loop"] == "hf-trainer-bf16" else "`bf16=False`"
        memory = plain["peak_rss_training_mb"] / by_loop[fp32_loop]["peak_rss_training_mb"]
        memory_bare = plain["peak_rss_training_mb"] / by_loop["bare-fp32"]["peak_rss_training_mb"]
        if native_bf16:
            parts = [f"vs bare fp32 {vs_bare:.2f}x (goal >= 2.5x, {verdict(vs_bare, 2.5)})"]
        else:
            parts = [f"vs bare fp32 {vs_bare:.2f}x (no goal without native bf16)"]
        parts += [
            f"vs the `Trainer` ({trainer_name}, the faster of its rows here) {vs_trainer:.2f}x "
            f"(goal >= {trainer_goal}x, {verdict(vs_trainer, trainer_goal)})"
            if not native_bf16
            else f"vs the `Trainer` {vs_trainer:.2f}x (goal >= 1.3x, {verdict(vs_trainer, 1.3)})",
            f"share of GEMM peak {_pct(share)} of the highest {plain['precision']} peak "
            f"probed in this run at {threads} thread(s) ({peak:.0f} GFLOP/s; "
            f"{_pct(plain['share_of_peak'])} of its own probe) (goal >= 50%, "
            f"{verdict(share, 0.5)})",
        ]
        if native_bf16:
            parts.append(
                f"peak memory {_pct(memory)} of fedsilo's fp32 loop and {_pct(memory_bare)} of "
                f"the bare fp32 loop's (goal <= 60%: {verdict(memory, 0.6, at_most=True)} against "
                f"the first, {verdict(memory_bare, 0.6, at_most=True)} against the second)"
            )
        else:
            parts.append(
                f"peak memory {_pct(memory_bare)} of the bare fp32 loop's (the 60%-of-fp32 goal "
                "does not apply: `auto` trains in fp32 here)"
            )
        if "fedsilo-plain-eager" in by_loop:
            gain = speed / by_loop["fedsilo-plain-eager"]["tokens_per_s"]
            parts.append(f"compiled {gain:.2f}x the eager loop's tokens/s")
        if "fedsilo-dp" in by_loop:
            dp = by_loop["fedsilo-dp"]
            dp_time = speed / dp["tokens_per_s"]
            rate = (
                dp["achieved_gflops"] / plain["achieved_gflops"]
                if "achieved_gflops" in dp
                else None
            )
            parts.append(
                f"DP-SGD takes {dp_time:.2f}x plain's time per token (goal <= 1.2x, "
                f"{verdict(dp_time, 1.2, at_most=True)})"
                + (
                    f" at {rate:.2f}x plain's GFLOP/s: the gap is the positions it computes "
                    "(each record's own copy of the prompt prefix, and padding), not the "
                    "per-example gradients"
                    if rate is not None and rate >= 0.9
                    else ""
                )
            )
        lines.append(f"Goals, {threads} thread(s), fedsilo plain: " + "; ".join(parts) + ".")
        lines.append("")
    return lines[:-1]


def _memory_parts(row: dict[str, Any]) -> str:
    """Peak training memory split into the runtime before the model loads, the model and the
    encoded data, and what training adds; '-' for rows measured before the split existed."""
    if "rss_after_load_mb" not in row:
        return "-"
    runtime, loaded = row["rss_before_load_mb"], row["rss_after_load_mb"]
    training = row["peak_rss_training_mb"] - loaded
    return f"{runtime:.0f} / {loaded - runtime:.0f} / {training:.0f}"


def _compiled(row: dict[str, Any]) -> str:
    """Whether the loop ran compiled, with its untimed warm-up (which holds the compilation)."""
    if "compiled" not in row:
        return "-"  # measured before fedsilo compiled
    return f"{'yes' if row['compiled'] else 'no'} ({row['warmup_seconds']:.0f})"


_THROUGHPUT_COUNTING = (
    ". GFLOP/s counts "
    "4 FLOPs per weight per position a matrix is applied to (forward and activation "
    "gradient): the decoder's 106.2M matrix weights at every position the loop computes, "
    "padding included (fedsilo's plain loop packs each micro-batch into one row that computes "
    "the prompt prefix its examples share once, so it computes fewer positions than its "
    "examples hold tokens; tokens/s counts the examples' tokens for every loop), and "
    "the LM head's 28.3M at every position for full logits or only at labelled positions "
    "(fedsilo: the timed tokens times the dataset's share of labelled tokens). "
    "The GEMM peak is a 512x576 by 576x1536 product in the loop's precision, "
    "measured in the same process. `eval loss`: mean answer loss of 64 held-out examples "
    "after training (equal training quality shows as equal eval loss). `attention`: the "
    "kernel the loop ran (the others' loops run Hugging Face's default, `sdpa`; fedsilo "
    "loads `eager` on the CPU, faster at these lengths). Peak memory is the process's "
    "resident set during training, split into the runtime before the model loads "
    "(Python, torch, transformers, peft), the loaded model and encoded data, and what "
    "training adds; fp32 weights stay memory-mapped from the safetensors file and count "
    "as resident only once training touches them, so for fp32 loops most of the model "
    "shows under training (bf16 weights are a converted copy, resident at load). "
    "`compiled`: fedsilo's loops (plain and DP-SGD) run each decoder layer through "
    "`torch.compile` where a probe compilation succeeds (`[train] compile = auto`; the "
    "other loops and `fedsilo-plain-eager` run eager); the warm-up is the untimed first "
    "steps, compilation included (inductor's on-disk cache from an earlier process "
    "shortens it). DP-SGD keeps one padded row per record: each record's gradient must "
    "include what its own copy of the shared prefix contributes, so the prefix is computed "
    "for every record and packing saves it nothing."
)


def _throughput_section(
    result: dict[str, Any] | None, source: str, heading: str, command: str, *, full: bool = True
) -> list[str]:
    lines = [heading, ""]
    if result is None or "rows" not in result:
        return [*lines, f"Not measured yet: run `{command}`.", ""]
    lines += [
        f"`{command}` trains the same LoRA adapter (rank 8, all "
        f"projections) of `{result['model']}` on the same ICD-10 examples (about 60 tokens, about "
        f"5 of them answer), batch {result['batch_size']}, {result['steps']} steps of which the "
        f"first {result['warmup_steps']} are not timed, one process per loop and thread count. "
        f"Native bf16 on this CPU: {'yes' if result['native_bf16'] else 'no'}"
        + (
            f" ({result['cpu_model']}; {', '.join(result['bf16_flags']) or 'no bf16 units'})"
            if "cpu_model" in result
            else ""
        )
        + (_THROUGHPUT_COUNTING if full else ". Loops, counting and columns as above."),
        "",
        "| loop | threads | attention | compiled (warm-up s) | tokens/s | vs bare fp32 | padding "
        "| GFLOP/s | share of GEMM peak | eval loss | peak memory (MB) | of which runtime / model "
        "and data / training (MB) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = result["rows"]
    for row in rows:
        bare = next(
            (r for r in rows if r["loop"] == "bare-fp32" and r["threads"] == row["threads"]), None
        )
        ratio = f"{row['tokens_per_s'] / bare['tokens_per_s']:.2f}x" if bare else "-"
        lines.append(
            f"| {_LOOP_NAMES.get(row['loop'], row['loop'])} | {row['threads']} | "
            f"{row.get('attention', 'sdpa')} | {_compiled(row)} | {row['tokens_per_s']:.0f} | "
            f"{ratio} | "
            f"{_pct(row['padding_share'])} | "
            f"{row['achieved_gflops']:.0f} | {_pct(row['share_of_peak'])} "
            f"(of {row['gemm_peak_gflops']:.0f}) | {row['eval_loss']:.3f} | "
            f"{row['peak_rss_training_mb']:.0f} | {_memory_parts(row)} |"
        )
    lines += [
        "",
        *_throughput_goals(
            rows,
            native_bf16=result["native_bf16"],
            one_thread_peaks=result.get("gemm_gflops_one_thread"),
        ),
    ]
    for again in result.get("remeasured", []):
        lines += [
            "",
            f"Re-measured: {_LOOP_NAMES.get(again['loop'], again['loop'])}, "
            f"{again['threads']} thread(s), first read {again['first_tokens_per_s']:.0f} "
            f"tokens/s ({again['reason']}).",
        ]
    gemm = result.get("gemm_gflops_one_thread")
    bf16_rows = [row for row in rows if row["loop"] in ("bare-bf16", "hf-trainer-bf16")]
    if gemm is not None and not result["native_bf16"]:
        lines += [
            "",
            f"GEMM on one thread here: fp32 {gemm['fp32']:.1f} GFLOP/s, bf16 {gemm['bf16']:.1f} "
            f"GFLOP/s ({gemm['fp32'] / gemm['bf16']:.0f}x slower: no bf16 units, emulated)"
            + ("" if bf16_rows else "; the bf16 loops were not run on this CPU")
            + ". `precision = auto` resolves to fp32, so fedsilo's `auto` rows are its fp32 loop.",
        ]
    lines += [
        "",
        f"Measured {result['measured_at']} on {result['machine']['cpus']} CPU cores "
        f"(torch {result['torch']}); source: `benchmarks/results/{source}`.",
        "",
    ]
    return lines


def _prefix_gradient_section(result: dict[str, Any] | None) -> list[str]:
    lines = ["### Why DP-SGD computes every record's prompt prefix", ""]
    if result is None:
        return [*lines, "Not measured yet: run `python benchmarks/prefix_gradient.py`.", ""]
    cosine, norm, lora = result["cosine"], result["norm_ratio"], result["lora"]
    return [
        *lines,
        f"`python benchmarks/prefix_gradient.py`: after {result['plain_steps_first']} plain steps "
        f"(batch {result['batch_size']}, LoRA rank {lora['rank']} on "
        f"{', '.join(lora['target_modules'])}), each of {result['records']} records' gradient "
        f"is taken twice: exactly, and with its {result['prefix_tokens']}-token shared prompt "
        f"prefix ({_pct(result['prefix_share'])} of the records' tokens) run once without "
        "gradient and read from the key-value cache, which is what sharing the prefix under "
        "DP-SGD would take (same forward pass and loss, checked). The cut gradient has cosine "
        f"{cosine['mean']:.3f} with the exact one (lowest {cosine['min']:.3f}) and "
        f"{norm['mean']:.2f} of its norm; the sums of the clipped gradients (clip "
        f"{result['clip']:g}), what a step adds noise to, have cosine "
        f"{result['clipped_sum_cosine']:.3f}. A record's gradient would change by that much, "
        "so fedsilo keeps the exact one and computes the prefix for every record: that, not "
        "the per-example bookkeeping, is why DP-SGD takes about twice plain training's time "
        "per token.",
        "",
        f"Measured {result['measured_at']} on {result.get('cpu_model', 'a CPU')} "
        f"({result['machine']['cpus']} cores, one torch thread, fp32; torch {result['torch']}); "
        "source: `benchmarks/results/prefix-gradient.json`.",
        "",
    ]


def _precision_agreement_section(agreement: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    if agreement is not None:
        runs = agreement["runs"]
        lines += [
            "### bf16 against fp32",
            "",
            "`python benchmarks/precision_agreement.py`: the same seed, examples and batches, "
            f"{runs['fp32']['steps']} steps of {runs['fp32']['batch_size']}, one thread each, then "
            f"the answer loss of {runs['fp32']['gold_count']} gold records. Goal: both within 3%.",
            "",
            "| precision | final train loss (last 20 steps) | gold loss | tokens/s | padding |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {name} | {run['final_train_loss']:.4f} | {run['gold_loss']:.4f} | "
                f"{run['tokens_per_s']:.0f} | {_pct(run['padding_share'])} |"
                for name, run in runs.items()
            ),
            "",
            f"Difference: train loss {_pct(agreement['train_loss_difference'])}, gold loss "
            f"{_pct(agreement['gold_loss_difference'])}; bf16 ran "
            f"{agreement['speedup_bf16']:.2f}x as fast. Measured {agreement['measured_at']}.",
            "",
        ]
    return lines


def _interval(values: Any) -> str:
    return "" if not values else f" [{_pct(values[0])}, {_pct(values[1])}]"


def _demo_parts(parts: dict[str, Any] | None) -> str:
    """The gold parts besides the headline, one short phrase each."""
    if not parts:
        return "-"
    shown = []
    phrasing = parts.get("phrasing")
    if phrasing:
        shown.append(
            f"phrasings: category {_pct(phrasing['category_accuracy'])}, exact "
            f"{_pct(phrasing['accuracy'])}"
        )
    ranking = parts.get("ranking")
    if ranking:
        shown.append(f"ranking: top-1 {_pct(ranking['top1'])}, top-5 {_pct(ranking['top5'])}")
    return "; ".join(shown) or "-"


def _demo_shape_section(result: dict[str, Any] | None) -> list[str]:
    """The validation-split runs that chose the demo's rounds and local work."""
    if result is None:
        return []
    lines = [
        "### How the demo's federation was shaped",
        "",
        f"`python benchmarks/demo_shape.py` ({result['what']}):",
        "",
        "| training | rounds | local work per round | learning rate | optimizer steps "
        "| validation category accuracy | validation loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        training = (
            "centralized (pooled records)"
            if row["mode"] == "centralized"
            else (
                f"FedAdam (server rate {row['server_learning_rate']:g})"
                if row["strategy"] == "fedadam"
                else "FedAvg"
            )
        )
        if row.get("server_step") not in (None, 1.0):
            training += f", server step {row['server_step']:g}"
        if row["mode"] == "local":
            worst = row["worst_validation_category_accuracy"]
            training = f"local only (mean of the sites; worst site {_pct(worst)})"
        if row.get("batch_size", 16) != 16:
            training += f", batches of {row['batch_size']}"
        if row.get("server_momentum"):
            training += f", server momentum {row['server_momentum']:g}"
        if row.get("examples_per_site"):
            training += f", {row['examples_per_site']} codes per site"
        if row.get("note"):
            training += f" ({row['note']})"
        local_work = (
            f"{row['local_steps']} steps"
            if row.get("local_steps")
            else f"{row['local_epochs']:g} epoch"
        )
        lines.append(
            f"| {training} | {row['rounds']} | {local_work} | "
            f"{row['learning_rate']:g} | {row['optimizer_steps']} | "
            f"{_pct(row['validation_category_accuracy'])} of {row['validation_count']} | "
            f"{row['validation_loss']:.3f} |"
        )
    return [
        *lines,
        "",
        f"Choice: {result['choice']}.",
        "",
        "Caution: rows with different codes per site are scored on different validation records "
        "(the count after 'of'), so their accuracies compare only within one site size; the "
        "choice of 600 codes over 1,200 rests on such a comparison.",
        "",
    ]


def _demo_section(result: dict[str, Any] | None) -> list[str]:
    lines = ["## `fedsilo demo`: gold set before and after", ""]
    if result is None:
        return [*lines, "Not measured yet: run `bash benchmarks/demo_clean_clone.sh`.", ""]
    demo_config = tomllib.loads(result["config"])
    momentum = demo_config["strategy"].get("server_momentum", 0.0)
    lines += [
        "`bash benchmarks/demo_clean_clone.sh` runs README command 1 on a fresh clone (install, "
        "the model's one-time conversion, `fedsilo demo`) and `benchmarks/demo_quality.py` "
        f"reads the run's metrics: SmolLM2-135M-Instruct, 4 hospitals by specialty "
        f"({demo_config['task']['examples_per_site']} codes each at most, with their inclusion "
        f"terms), {result['rounds']} rounds of FedAvg"
        f"{f' with server momentum {momentum:g}' if momentum else ''}. Headline: category "
        "accuracy on "
        f"{result['gold_count']} codes no site trained on whose category a site trains on "
        "(95% bootstrap interval); exact code beside it; the other gold parts after them.",
        "",
        "| round | train loss | category (headline) | exact code | gold loss | other parts "
        "| tokens | training s | tokens/s | seconds |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["per_round"]:
        train_loss = "-" if row["train_loss"] is None else f"{row['train_loss']:.3f}"
        speed = row.get("train_tokens_per_s")
        gold_loss = "-" if row.get("gold_loss") is None else f"{row['gold_loss']:.3f}"
        lines.append(
            f"| {row['round']} | {train_loss} | {_pct(row.get('gold_category_accuracy'))}"
            f"{_interval(row.get('gold_category_accuracy_ci95'))} | "
            f"{_pct(row.get('gold_accuracy'))} | {gold_loss} | "
            f"{_demo_parts(row.get('gold_parts'))} | {row.get('tokens') or 0:,} | "
            f"{row.get('train_seconds') or 0:.0f} | {'-' if not speed else f'{speed:.0f}'} | "
            f"{row['seconds']:.0f} |"
        )
    install = result.get("install_seconds")
    concurrent = demo_config["run"].get("concurrent_sites", 1)
    if concurrent > 1:
        lines += [
            "",
            f"{concurrent} sites train at a time: training s is the sum of the sites' training "
            "times and tokens/s each site's own rate, so a round's wall time (seconds) is "
            "shorter than its training s.",
        ]
    parts_before = _demo_parts(result["before"].get("gold_parts"))
    parts_after = _demo_parts(result["after"].get("gold_parts"))
    headline = result["after"]["gold_category_accuracy"]
    interval = result["after"].get("gold_category_accuracy_ci95")
    verdict = "met" if headline >= 0.5 else "not met"
    if headline >= 0.5 and interval and interval[0] < 0.5:
        verdict = (
            f"met by the estimate; its 95% interval reaches below 50% on {result['gold_count']} "
            "records"
        )
    lines += [
        "",
        f"Other gold parts, before: {parts_before}; after: {parts_after}.",
        "",
        f"Goal: category accuracy >= 50% after training; measured "
        f"{_pct(headline)}{_interval(interval)} ({verdict}).",
        "",
        *(
            [
                f"Scoring the gold set (round 0: evaluation only) took "
                f"{result['evaluation_seconds']:.0f} s, "
                f"{_pct(result['evaluation_share_of_round'])} of a mean training round "
                f"({result['mean_round_seconds']:.0f} s). Goal: under 10%: "
                + ("met." if result["evaluation_share_of_round"] < 0.10 else "**not met**.")
                + (
                    f" The demo scores it {result['gold_scorings']} times (before training "
                    f"and after rounds where [evaluation] every_rounds says): "
                    f"{_pct(result['evaluation_share_of_wall'])} of the demo's wall time."
                    if "gold_scorings" in result
                    else ""
                )
            ]
            if "evaluation_seconds" in result
            else []
        ),
        "",
        (
            f"Whole wait: install {install:.0f} s + demo {result['wall_seconds']:.0f} s = "
            f"{result['total_seconds']:.0f} s (goal: <= 900 s)"
            if install is not None
            else f"Demo: {result['wall_seconds']:.0f} s wall"
        )
        + f", peak memory {result['peak_rss_mb']:.0f} MB, measured {result['measured_at']} on "
        f"{result['machine']['cpus']} CPU cores; source: `benchmarks/results/demo.json`.",
        "",
    ]
    return lines


def _demo_elsewhere_section(
    result: dict[str, Any] | None, main: dict[str, Any] | None
) -> list[str]:
    """README command 1 measured again on a CPU without native bf16 (where `precision = auto`
    trains in fp32), in a few lines beside the main run's."""
    if result is None:
        return []
    machine = result["machine"]
    after = result["after"]
    install = result.get("install_seconds")
    total = result.get("total_seconds")
    wait = (
        f"install {install:.0f} s + demo {result['wall_seconds']:.0f} s = {total:.0f} s"
        if install is not None and total is not None
        else f"demo {result['wall_seconds']:.0f} s"
    )
    verdict = "met" if (total or result["wall_seconds"]) <= 900 else "**not met**"
    trained = [r for r in result["per_round"] if r["round"] > 0]
    precisions = sorted({str(r.get("precision")) for r in trained})
    lines = [
        "### The same on a CPU without native bf16",
        "",
        f"`bash benchmarks/demo_clean_clone.sh {DEMO_NO_NATIVE_BF16}` on "
        f"{machine.get('cpu_model', 'an unnamed CPU')} ({machine['cpus']} cores, native bf16: "
        f"{'yes' if machine.get('native_bf16') else 'no'}; rounds trained in "
        f"{', '.join(precisions)}): {wait} (goal <= 900 s: {verdict}); a round took "
        f"{result['mean_round_seconds']:.0f} s"
        + (f" against {main['mean_round_seconds']:.0f} s above" if main else "")
        + f". After {result['rounds']} rounds: category accuracy "
        f"{_pct(after['gold_category_accuracy'])}"
        f"{_interval(after.get('gold_category_accuracy_ci95'))}, exact "
        f"{_pct(after['gold_accuracy'])}, gold loss {after['gold_loss']:.3f}; other parts: "
        f"{_demo_parts(after.get('gold_parts'))}. Measured {result['measured_at']}; source: "
        f"`benchmarks/results/{DEMO_NO_NATIVE_BF16}`.",
        "",
    ]
    return lines


def _demo_adapter_mismatch(result: dict[str, Any], demo: dict[str, Any]) -> list[str]:
    """How the adapter the audit was measured on differs from the measured demo's (empty: the
    same base model, LoRA rank and targets, and number of sites)."""
    built = result.get("adapter_built_from")
    if result.get("adapter") != "demo" or not isinstance(built, dict):
        return ["not measured on the demo's adapter"]
    config = tomllib.loads(demo["config"])
    expected = {
        "base": config.get("model", {}).get("base"),
        "rank": config.get("lora", {}).get("rank"),
        "target_modules": config.get("lora", {}).get("target_modules"),
        "sites": config.get("task", {}).get("num_sites"),
    }
    return [
        f"{name} {built.get(name)!r} against the demo's {value!r}"
        for name, value in expected.items()
        if built.get(name) != value
    ]


def _audit_reference(
    audit_s: float, demo: dict[str, Any] | None, result: dict[str, Any]
) -> list[str]:
    """The audit's cost per round against the demo's current round (benchmarks/results/demo.json),
    read when the page is generated, so a re-measured demo is never compared with an old one."""
    if demo is None:
        return []
    rounds = [r for r in demo["per_round"] if r["round"] > 0 and r.get("train_seconds")]
    if not rounds:
        return []
    round_s = statistics.median(r["seconds"] for r in rounds)
    per_site_s = statistics.median(r["train_seconds"] / r["sites_ok"] for r in rounds)
    run = tomllib.loads(demo["config"]).get("run", {})
    lora = tomllib.loads(demo["config"]).get("lora", {})
    targets = ", ".join(lora.get("target_modules", [])) or "the default modules"
    at_once = run.get("concurrent_sites", 1)
    # The demo runs every site on one machine, so its round pays every site's signing.
    one_machine_s = result.get("median_audit_s_per_round_one_machine", audit_s)
    mismatch = _demo_adapter_mismatch(result, demo)
    return [
        "",
        f"Against the demo's measured round ({round_s:.0f} s for {rounds[0]['sites_ok']} sites, "
        f"{at_once} training at a time; {per_site_s:.0f} s of local training per site; "
        f"`benchmarks/results/demo.json`): every site's signing and the coordinator's work, "
        f"{1000 * one_machine_s:.0f} ms, are {_pct(one_machine_s / round_s)} of a demo round; "
        f"one site's signing and the coordinator's work are {_pct(audit_s / per_site_s)} of one "
        "site's local training (the round time when every site trains on its own machine). "
        "Goal: < 2%."
        + (
            f" Measured on the demo's own adapter ({result['payload_bytes'] / 1e6:.1f} MB per "
            "update)."
            if not mismatch
            else f" Caution: the audit was measured on updates of "
            f"{result['payload_bytes'] / 1e6:.1f} MB ({'; '.join(mismatch)}); the demo's "
            f"adapter (LoRA rank {lora.get('rank')} on {targets} of its base model) is another "
            "size, and hashing and signing grow with the bytes, so these shares hold at the "
            "measured size only (`--demo-adapter` measures the demo's)."
        ),
    ]


def _audit_section(result: dict[str, Any] | None, demo: dict[str, Any] | None) -> list[str]:
    lines = ["## Cost of signatures and the audit ledger", ""]
    if result is None:
        return [*lines, "Not measured yet: run `python benchmarks/audit_overhead.py`.", ""]
    lines += [
        f"`{result.get('command', 'python benchmarks/audit_overhead.py')}`: "
        f"{result['sites']} sites, adapters of "
        f"{result['params_per_adapter']:,} fp32 parameters "
        f"({result.get('adapter_description', 'LoRA-shaped tensors')}; "
        f"{result['payload_bytes']:,} bytes of "
        f"safetensors), {result['rounds']} rounds, {result['ledger_entries_per_round']} ledger "
        "entries per round. Per round: each site's encoding, hashing and signing, and "
        "the coordinator's adapter and server-state digests, digest checks, signature checks, "
        "ledger writes and receipts.",
        "",
        "| round | slowest site signing (ms) | all sites' signing (ms) | coordinator (ms) |",
        "|---:|---:|---:|---:|",
    ]
    every_site = result.get("all_sites_signing_s") or [None] * len(result["coordinator_s"])
    for index, (site_s, sites_s, coordinator_s) in enumerate(
        zip(result["slowest_site_signing_s"], every_site, result["coordinator_s"], strict=True),
        start=1,
    ):
        all_sites = "-" if sites_s is None else f"{1000 * sites_s:.1f}"
        lines.append(
            f"| {index} | {1000 * site_s:.1f} | {all_sites} | {1000 * coordinator_s:.1f} |"
        )
    lines += [
        "",
        f"Median per round, slowest site and coordinator: "
        f"{1000 * result['median_audit_s_per_round']:.1f} ms.",
    ]
    lines += _audit_reference(result["median_audit_s_per_round"], demo, result)
    lines += [
        "",
        f"Measured {result['measured_at']} on {result['machine']['cpus']} CPU cores; source: "
        "`benchmarks/results/audit_overhead.json`.",
        "",
    ]
    return lines


def _concurrent_sites_section(result: dict[str, Any] | None) -> list[str]:
    """Sites in turn with two threads against side by side with one each (run.concurrent_sites)."""
    if result is None:
        return []
    medians = result["median_tokens_per_s"]
    return [
        "## Simulated sites in turn or side by side",
        "",
        f"`python benchmarks/concurrent_sites.py` ({result['what']}; {result['model']}, "
        f"{result['precision']}, {result['steps_per_site']} steps per site, median of "
        f"{result['repeats']}):",
        "",
        "| how the in-process engine trains two sites | tokens/s |",
        "|---|---:|",
        "| in turn, 2 torch threads (`concurrent_sites = 1`) | "
        f"{medians['in_turn_2_threads']:.0f} |",
        "| side by side, 1 torch thread each (`concurrent_sites = 2`) | "
        f"{medians['side_by_side_2x1_thread']:.0f} |",
        "",
        f"Side by side trains {result['speedup_side_by_side']:.2f}x as fast, at the memory of "
        "one more copy of the model. Measured "
        f"{result['measured_on']} on {result['machine']['cpus']} CPU cores; source: "
        "`benchmarks/results/concurrent-sites.json`.",
        "",
    ]


def main() -> None:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; rerun the",
        "scripts named below to refresh them. Timings are from the machine named in each section.",
        "",
        *_throughput_section(
            _load("throughput.json"),
            "throughput.json",
            "## Local-training throughput",
            "python benchmarks/throughput.py",
        ),
        *_throughput_section(
            _load(NO_NATIVE_BF16_THROUGHPUT),
            NO_NATIVE_BF16_THROUGHPUT,
            "### The same on a CPU without native bf16",
            f"python benchmarks/throughput.py --out benchmarks/results/{NO_NATIVE_BF16_THROUGHPUT}",
            full=False,
        ),
        *_prefix_gradient_section(_load("prefix-gradient.json")),
        *_precision_agreement_section(_load("precision-agreement.json")),
        *_demo_section(_load("demo.json")),
        *_demo_elsewhere_section(_load(DEMO_NO_NATIVE_BF16), _load("demo.json")),
        *_demo_shape_section(_load("demo-shape.json")),
        *_concurrent_sites_section(_load("concurrent-sites.json")),
        *_audit_section(_load("audit_overhead.json"), _load("demo.json")),
        *attack_section(
            {
                name: result
                for name in (
                    "privacy-attacks-tiny.json",
                    "privacy-attacks-smollm2-64-records.json",
                    "privacy-attacks-smollm2.json",
                )
                if (result := _load(name)) is not None
            }
        ),
        *sweep_section(
            {path.name: json.loads(path.read_text()) for path in RESULTS.glob("dp-sweep*.json")}
        ),
        *utility_section(_load("privacy-utility.json")),
        *signal_section(
            {path.name: json.loads(path.read_text()) for path in RESULTS.glob("dp-signal*.json")}
        ),
        *site_dp_section(_load("site-level-dp.json")),
        *distill_section(_load("distill.json")),
        *secagg_section(_load("secure-aggregation.json")),
        *quality_sections(),
        *scale_section(),
        *deployment_section(
            [r for name in ("deployment.json", "deployment-smollm2.json") if (r := _load(name))]
        ),
    ]
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text("\n".join(lines))
    print(f"wrote {PAGE}")
    fill_compliance_page(_load("privacy-utility.json"), _load("privacy-attacks-smollm2.json"))
    fill_compliance_site_table(_load("site-level-dp.json"))


if __name__ == "__main__":
    main()
