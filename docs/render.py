"""Fills every published number in README.md and docs/*.md from the committed result files, so none is typed by hand.

    python docs/render.py           # rewrite the blocks
    python docs/render.py --check   # exit 1 and name the blocks that differ (tests/test_docs.py runs this)

A block is the text between `<!-- begin: NAME -->` and `<!-- end: NAME -->`; BLOCKS maps each NAME to the function
that writes it from bench/results/ (the benchmarks' JSON) and bench/results/tasks/ (the shipped tasks' metrics,
written by `python -m bench.shipped_tasks`). Each block names its source file, the machine, the library versions
and the commit measured. Memory is given in GiB (2**30 bytes) everywhere.
"""

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- begin: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)
GIB, GB, MIB = 2**30, 10**9, 2**20
VERSIONED = ("torch", "transformers", "peft", "trl", "bitsandbytes")


def result(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        writer = "python -m bench.shipped_tasks" if name.startswith("tasks/") else "its script in bench/"
        raise SystemExit(f"{path.relative_to(ROOT)}: no such result file; write it with {writer}")
    return json.loads(path.read_text())


def gib(value: float, unit: float) -> str:
    return f"{value * unit / GIB:.2f}"


def paragraphs(*parts: str) -> str:
    return "\n\n".join(parts)


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A Markdown table; `align` has one character per column, `l` or `r` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])


def source(name: str) -> str:
    """Where a block's numbers come from: the file, the machine, the versions and the commit it records."""
    document = result(name)
    machine = document.get("machine")
    if machine is None:
        return f"Source: `bench/results/{name}.json` (machine, versions and commit not recorded)."
    versions = machine.get("versions") or {"torch": machine["torch"]}
    shown = ", ".join(f"{lib} {versions[lib]}" for lib in VERSIONED if versions.get(lib))
    commit = machine.get("commit") or document.get("project", {}).get("head", "")[:12] or "not recorded"
    device = machine.get("gpu") or f"{machine['nproc']} CPU cores ({machine['cpu_model']})"
    return f"Source: `bench/results/{name}.json`; {device}, {shown}; commit {commit}."


def load_note(document: dict) -> str:
    """The machine's 1-minute load average over a run: other work slows it, so its seconds are read with this."""
    load = document["load_average"]
    start, end = (load["before"], load["after"]) if "before" in load else (load["start"][0], load["end"][0])
    return (
        f"1-minute load average {start:.1f} → {end:.1f} on {document['machine']['nproc']} cores: times depend on "
        "what else ran on the machine"
    )


def before_after(metrics: dict, keys: list[str]) -> str:
    """Before and after per metric; `retention_kept` exists only after (a share of what the base answered before)."""
    rows = [[f"`{key}`", f"{metrics['before'][key]:.3f}", f"{metrics['after'][key]:.3f}"] for key in keys]
    if "retention_kept" in metrics["after"]:
        rows.append(["`retention_kept`", "", f"{metrics['after']['retention_kept']:.3f}"])
    return table(["metric", "before", "after"], rows)


def task_run(name: str) -> str:
    """A shipped task's run: steps, trainable parameters, the seconds and the load they were measured under."""
    document = result(f"tasks/{name}")
    metrics = document["metrics"]
    memory = f", peak RSS {gib(metrics['peak_rss_mib'], MIB)} GiB" if "peak_rss_mib" in metrics else ""
    return (
        f"`{document['command']}`: {metrics['global_step']} optimizer steps, "
        f"{metrics['trainable_parameters']:,} trainable parameters{memory}; training {metrics['train_seconds']:.0f} s, "
        f"the whole command {document['wall_seconds'] / 60:.1f} min ({load_note(document)}; the metrics do not)."
    )


# --- the shipped tasks (bench/results/tasks/) ---------------------------------------------------------------------

SFT_KEYS = ["eval_loss", "eval_exact_match", "eval_f1", "train_exact_match", "train_f1", "retention_accuracy"]
DPO_KEYS = [
    "preference_accuracy",
    "reference_preference_accuracy",
    "reward_margin",
    "reward_accuracy",
    "sft_eval_loss",
    "sft_eval_exact_match",
    "sft_eval_f1",
    "sft_train_exact_match",
    "sft_train_f1",
    "retention_accuracy",
]


def not_run_yet(task: str) -> str | None:
    """A shipped task's run takes long on a CPU: until its result file is committed, its blocks say so (no number)."""
    if (RESULTS / "tasks" / f"{task}.json").is_file():
        return None
    return f"*No committed result for `{task}` yet: `python -m bench.shipped_tasks --only {task}` writes it.*"


def main_job() -> str:
    return before_after(result("tasks/nasa_qa")["metrics"], SFT_KEYS)


def main_job_dpo_line() -> str:
    if missing := not_run_yet("nasa_qa_dpo"):
        return missing
    metrics = result("tasks/nasa_qa_dpo")["metrics"]
    b, a = metrics["before"], metrics["after"]
    return (
        f"Then `lmdiff-ft dpo`: held-out preference accuracy {b['preference_accuracy']:.3f} → "
        f"{a['preference_accuracy']:.3f}, and the SFT task's held-out exact match {b['sft_eval_exact_match']:.3f} → "
        f"{a['sft_eval_exact_match']:.3f}."
    )


def nasa_qa() -> str:
    return paragraphs(main_job(), task_run("nasa_qa"), source("tasks/nasa_qa"))


def nasa_qa_dpo() -> str:
    if missing := not_run_yet("nasa_qa_dpo"):
        return missing
    metrics = result("tasks/nasa_qa_dpo")["metrics"]
    return paragraphs(before_after(metrics, DPO_KEYS), task_run("nasa_qa_dpo"), source("tasks/nasa_qa_dpo"))


def mission_type() -> str:
    if missing := not_run_yet("mission_type"):
        return missing
    metrics = result("tasks/mission_type")["metrics"]
    keys = ["eval_loss", "eval_accuracy", "train_accuracy", "retention_accuracy"]
    return paragraphs(before_after(metrics, keys), task_run("mission_type"), source("tasks/mission_type"))


def nasa_qa_mixed() -> str:
    """docs/tasks.md's "Everything together": what the run logged at each evaluation, and what it published."""
    if missing := not_run_yet("nasa_qa_mixed"):
        return missing
    metrics = result("tasks/nasa_qa_mixed")["metrics"]
    before_after_table = before_after(metrics, ["eval_loss", "eval_exact_match", "eval_f1", "retention_accuracy"])
    curve = table(["step", "eval loss"], [[str(p["step"]), f"{p['eval_loss']:.3f}"] for p in metrics["eval_curve"]])
    best, steps = metrics["best_checkpoint"], metrics["global_step"]
    train = yaml.safe_load((ROOT / "tasks" / "nasa_qa_mixed.yaml").read_text())["train"]
    max_steps, scored = train["max_steps"], train["eval_generation_samples"]
    stopped = (
        f"early stopping ended training at step {steps}" if steps < max_steps else f"training ran all {steps} steps"
    )
    published = (
        f"Exact match on the {scored} answers scored at each evaluation was best at step {best['step']} "
        f"({best['metric']:.3f}) and not beaten after; {stopped}, and the run published checkpoint-{best['step']}. "
        'The table\'s "after" is that checkpoint on every eval row.'
    )
    return paragraphs(before_after_table, curve, published, task_run("nasa_qa_mixed"), source("tasks/nasa_qa_mixed"))


# --- benchmarks (bench/results/) --------------------------------------------------------------------------------

SFT_STEP_RUNS = [
    ("sft_step_baseline", "before (recomputation, one micro-batch of 16, LM head on every position)"),
    ("sft_step", "**as shipped**"),
    ("sft_step_bf16", "as shipped, `dtype=bfloat16`"),
    ("sft_step_checkpointing", "as shipped, `train.gradient_checkpointing=true`"),
]


def sft_step() -> str:
    rows = []
    for name, label in SFT_STEP_RUNS:
        r = result(name)
        profile = r["profile_s"]
        parts = [f"{profile[k]:.1f} ({100 * profile[k] / profile['total']:.0f}%)" for k in list(profile)[:-1]]
        rows.append([label, f"{r['step_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_gib']:.2f}", *parts])
    header = ["step", "s / step", "tokens/s", "peak RSS (GiB)", *(f"{k} (s)" for k in list(profile)[:-1])]
    shipped, baseline = result("sft_step"), result("sft_step_baseline")
    products = shipped["matrix_products"]
    note = (
        f"The step's {shipped['rows']} rows hold {shipped['tokens']:,} tokens, {shipped['trained_tokens']} of them "
        f"with a label; padded to {shipped['padded_tokens']:,} tokens in {shipped['micro_batches']} micro-batches "
        f"({baseline['padded_tokens']:,} in {baseline['micro_batches']} before). "
        f"As shipped, the step's matrix products are {products['flops'] / 1e12:.2f} TFLOP over "
        f"{products['shapes']} shapes: {products['gflop_per_s_in_step']:.0f} GFLOP/s in the step, "
        f"{products['gflop_per_s_as_plain_products']:.0f} GFLOP/s as plain `torch.mm` calls of the same shapes "
        f"({products['seconds_as_plain_products']:.1f} s)."
    )
    loads = ", ".join(f"{result(name)['load_average'][0]:.1f}" for name, _ in SFT_STEP_RUNS)
    return paragraphs(
        table(header, rows), note, f"1-minute load average at the start of each row: {loads}.", source("sft_step")
    )


def sft_throughput() -> str:
    document = result("sft_throughput")
    rows = [
        [
            r["label"],
            r["quantization"],
            f"{r['trained_tokens_per_s']:.2f}",
            f"{r['total_tokens_per_s']:.0f}",
            f"{r['step_s']:.1f}",
            gib(r["peak_rss_mib"], MIB),
            f"{r['trainable_params']:,}",
        ]
        for r in document["rows"]
    ]
    header = ["trainer", "quantization", "trained tokens/s", "total tokens/s", "s / step", "peak RSS (GiB)"]
    ratios = ", ".join(f"{r['trained_tokens_per_s']:.2f}× with {r['quantization']}" for r in document["ratios"])
    return paragraphs(
        table([*header, "trainable parameters"], rows),
        f"`lmdiff-ft sft` ÷ stock TRL, trained tokens/s: {ratios}. "
        f"Median of {document['flags']['repeats']} interleaved rounds of {document['flags']['steps']} steps; "
        f"{load_note(document)}.",
        source("sft_throughput"),
    )


def train_step() -> str:
    document = result("train_step")
    ratios = {r["over"]: r["ratio"] for r in document["ratios"] if r["variant"] == "lmdiff"}
    rows = [
        [
            r["label"],
            f"{r['tokens_per_s']:.0f}",
            "—" if r["variant"] == "lmdiff" else f"{ratios[r['variant']]:.2f}",
            f"{r['mfu']:.2f}",
            gib(r["step_peak_mib"], MIB),
        ]
        for r in document["rows"]
    ]
    attn = next(r["ratio"] for r in document["ratios"] if r["variant"] == "lmdiff-attn")
    dims = document["dims"]
    ours, llama = (next(r for r in document["rows"] if r["variant"] == v) for v in ("lmdiff", "llama"))
    flops = ours["flops_per_token"] / llama["flops_per_token"]
    split = (
        f"LM-Diff does {flops:.2f}× Llama's FLOPs per token, so its speed over Llama's is its MFU over Llama's "
        f"({ours['mfu']:.2f} ÷ {llama['mfu']:.2f}) ÷ {flops:.2f}: at equal MFU it would be {1 / flops:.2f}×."
    )
    return paragraphs(
        table(["variant", "tokens/s", "LM-Diff speed ×", "MFU", "step peak (GiB)"], rows),
        split,
        f"LM-Diff with differential attention only ÷ DiffLlama (the same architecture): {attn:.2f}×. "
        f"Sequence length {document['rows'][0]['seq_len']}, batch 1, hidden {dims['hidden']}, "
        f"{dims['layers']} layers; GEMM rate {document['rows'][0]['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s; "
        f"{load_note(document)}.",
        source("train_step"),
    )


def decode() -> str:
    document = result("decode")
    ms = {(r["variant"], r["context"], r["cache"]): r["token_ms"] for r in document["rows"]}
    contexts = sorted({context for _, context, _ in ms})
    rows = [
        [
            str(c),
            f"{ms['lmdiff', c, True]:.1f}",
            f"{ms['llama', c, True]:.1f}",
            f"{ms['llama', c, True] / ms['lmdiff', c, True]:.2f}",
            f"{ms['lmdiff', c, False]:.0f}",
        ]
        for c in contexts
    ]
    header = ["context", "LM-Diff ms/token", "Llama ms/token", "LM-Diff ÷ Llama tokens/s", "LM-Diff ms/token, no cache"]
    growth = ms["lmdiff", contexts[-1], True] / ms["lmdiff", contexts[0], True]
    note = (
        f"With the cache, LM-Diff's time per token at context {contexts[-1]} is {growth:.2f}× that at context "
        f"{contexts[0]}. {document['dims']['layers']} layers of TinyLlama-1.1B's dims; {load_note(document)}."
    )
    return paragraphs(table(header, rows), note, source("decode"))


QLORA_LABELS = {
    "none-stock": "none (fp32)",
    "nf4-stock": "nf4, stock transformers",
    "nf4-streaming": "**nf4, `lmdiff-ft` streaming loader**",
    "int8-stock": "int8, stock transformers",
    "int8-streaming": "int8, `lmdiff-ft` streaming loader",
}


def qlora_memory() -> str:
    document = result("qlora_memory")
    rows = {(r["variant"], r["malloc"]): r for r in document["rows"]}
    none = rows["none-stock", "pinned"]["peak_rss_gb"]
    lines = [
        [
            label,
            gib(rows[v, "pinned"]["footprint_gb"], GB),
            gib(rows[v, "pinned"]["peak_rss_gb"], GB),
            f"{rows[v, 'pinned']['peak_rss_gb'] / none:.2f}",
            f"{rows[v, 'glibc']['peak_rss_gb'] / rows['none-stock', 'glibc']['peak_rss_gb']:.2f}",
        ]
        for v, label in QLORA_LABELS.items()
    ]
    header = ["load path", "base footprint (GiB)", "peak RSS (GiB)", "vs unquantized", "vs unquantized, glibc malloc"]
    checkpoint = document["checkpoint"]
    trainable = rows["nf4-streaming", "pinned"]["trainable_params"]
    return paragraphs(
        table(header, lines),
        f"Checkpoint: {checkpoint['layers']} layers, {gib(checkpoint['gb'], GB)} GiB on disk "
        f"({checkpoint['dtype_on_disk']}); sequence {document['seq_len']}, batch {document['batch']}, "
        f"r={document['lora_rank']} ({trainable:,} trainable parameters).",
        source("qlora_memory"),
    )


def dpo_memory() -> str:
    document = result("dpo_memory")
    peaks = {r["trainer"]: r["peak_rss_gb"] for r in document["rows"]}
    return paragraphs(
        f"Peak RSS: SFT {gib(peaks['sft'], GB)} GiB, DPO {gib(peaks['dpo'], GB)} GiB, "
        f"**DPO ÷ SFT = {document['dpo_over_sft_peak']:.2f}** ({document['quantization']}, sequences of "
        f"{document['seq_len']} tokens).",
        source("dpo_memory"),
    )


def transformers_model_tests() -> str:
    document = result("transformers_model_tests")
    labels = {"lmdiff": "LM-Diff", "llama": "Llama (control)"}
    rows = [[labels[m], *(str(c[k]) for k in ("passed", "failed", "skipped"))] for m, c in document["counts"].items()]
    versions = document["versions"]
    outcomes = [
        [f"`{d['test']}`", d["lmdiff"], d["llama"], d["reason"]]
        for kind, found in document["differences"].items()
        for d in found
    ]
    return paragraphs(
        table([f"model (transformers {versions['transformers']})", "passed", "failed", "skipped"], rows),
        "Every test whose outcome differs between the two models:",
        table(["test", "LM-Diff", "Llama", "reason given"], outcomes, align="llll"),
        source("transformers_model_tests"),
    )


def app_load() -> str:
    document = result("app_load")
    row = [
        str(document["clients"]),
        f"{document['requests']} × {document['columns_per_request']}",
        str(document["answered"]),
        str(document["refused"]),
        str(document["errors"]),
        f"{document['latency_p50_s']:.1f}",
        f"{document['latency_p95_s']:.1f}",
        gib(document["peak_rss_mib"], MIB),
    ]
    header = ["clients", "requests × columns", "answered", "refused", "failed", "p50 (s)", "p95 (s)", "peak RSS (GiB)"]
    disconnect = document["disconnect"]
    hosts = sorted({address.rsplit(":", 1)[0] for address in document["listening"]})
    off = document["connections_off_this_machine"]
    return paragraphs(
        table(header, [row]),
        f"Queue of {document['max_queue']}, {document['max_new_tokens']} new tokens per column; latencies include "
        f"the wait in the queue. A client that disconnected after {disconnect['streamed_updates_before_disconnect']} "
        f"streamed updates of a request that takes {disconnect['whole_request_s']:.1f} s in full left the app "
        f"computing for {disconnect['busy_after_s']:.2f} s more. The app listened on {', '.join(hosts)} only and "
        f"made {len(off) or 'no'} connection{'' if len(off) == 1 else 's'} off the machine; {load_note(document)}.",
        source("app_load"),
    )


def sweep_targets() -> str:
    """The shipped sweep's summary exactly as `lmdiff-ft sweep` wrote it from its result files (sweeps/targets/)."""
    summary = (ROOT / "sweeps" / "targets" / "summary.md").read_text().strip()
    results = [json.loads(p.read_text()) for p in (ROOT / "sweeps" / "targets" / "results").glob("*/*/seed*.json")]
    finished = sum(r["status"] == "ok" for r in results)
    sweep = yaml.safe_load((ROOT / "sweeps" / "targets.yaml").read_text())
    planned = len(sweep["tasks"]) * len(sweep["cells"]) * len(sweep["seeds"])
    hours = sum(r.get("wall_seconds", 0) for r in results) / 3600
    return paragraphs(
        f"From `sweeps/targets/summary.md` ({finished} of {planned} runs finished, {hours:.1f} h of runs on "
        f"{results[0]['cpu_count']} CPU cores; `lmdiff-ft sweep sweeps/targets.yaml` runs what is missing, "
        "`--summary-only` rebuilds the summary from the result files).",
        summary.replace("### ", "#### "),
        "![nasa_qa](../sweeps/targets/nasa_qa.png)\n\n![mission_type](../sweeps/targets/mission_type.png)",
    )


def what_a_cell_trains(overrides: dict) -> str:
    """A sweep cell's overrides in words: its presets, and the base, rank and dtype where it sets them."""
    words = ", ".join(overrides.get("adapter.presets", ["the task's presets"]))
    if overrides.get("base", "").endswith("-llama"):
        words += " on the unconverted Llama"
    if "adapter.r" in overrides:
        words += f", r={overrides['adapter.r']}"
    if "dtype" in overrides:
        words += f", {overrides['dtype']}"
    return words


def sweep_overview() -> str:
    """The README's view of the shipped sweep: per cell, what it learns on each task and what it keeps of the base's
    general answers, with the sweep's own noise verdicts against its reference (sweeps/targets/summary.json)."""
    from lmdiff_ft.commands.sweep_summary import delta_text, shown, versus

    summary = json.loads((ROOT / "sweeps" / "targets" / "summary.json").read_text())
    stats = {(c["task"], c["cell"]): c["metrics"] for c in summary["cells"]}
    reference = summary["reference"]
    cells = yaml.safe_load((ROOT / "sweeps" / "targets.yaml").read_text())["cells"]  # the sweep file's order
    primary = {"nasa_qa": "after.eval_exact_match", "mission_type": "after.eval_accuracy"}
    rows = []
    for cell, overrides in cells.items():
        params = stats[("nasa_qa", cell)]["trainable_parameters"]["mean"]
        row = [f"`{cell}`", what_a_cell_trains(overrides), f"{params:,.0f}"]
        for task, metric in primary.items():
            ours, theirs = stats.get((task, cell), {}), stats.get((task, reference), {})
            difference, verdict = versus(ours.get(metric), theirs.get(metric))
            n = ours.get(metric, {}).get("n", 0)
            kept = ours.get("after.retention_kept")
            kept_verdict = versus(kept, theirs.get("after.retention_kept"))[1]
            row += [
                f"{shown(ours.get(metric))} (n={n})",
                "reference" if cell == reference else delta_text(difference, verdict),
                shown(kept) if cell == reference or not kept_verdict else f"{shown(kept)} ({kept_verdict})",
            ]
        rows.append(row)
    header = ["cell", "trains", "trainable params"]
    header += ["nasa_qa exact match", "Δ", "kept", "mission_type accuracy", "Δ", "kept"]
    return paragraphs(
        table(header, rows, align="llrrrrrrr"),
        f"Mean ± std over seeds. Δ: the difference from `{reference}`, *beyond noise* when Welch's t-test finds it at "
        "95%; the verdict after kept compares it the same way. kept: the share of the general questions the base "
        "answered correctly that it still answers after training. Every column per task, and the plots: "
        "[docs/sweep.md](docs/sweep.md).",
        "![nasa_qa](sweeps/targets/nasa_qa.png)",
    )


BLOCKS: dict[str, Callable[[], str]] = {
    "main-job": main_job,
    "main-job-dpo": main_job_dpo_line,
    "nasa-qa": nasa_qa,
    "nasa-qa-mixed": nasa_qa_mixed,
    "nasa-qa-dpo": nasa_qa_dpo,
    "mission-type": mission_type,
    "sft-step": sft_step,
    "sft-throughput": sft_throughput,
    "train-step": train_step,
    "decode": decode,
    "qlora-memory": qlora_memory,
    "dpo-memory": dpo_memory,
    "transformers-model-tests": transformers_model_tests,
    "app-load": app_load,
    "sweep-targets": sweep_targets,
    "sweep-overview": sweep_overview,
}


def rendered(text: str, where: Path) -> str:
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise SystemExit(f"{where.relative_to(ROOT)}: unknown block {name!r} (known: {', '.join(BLOCKS)})")
        return f"{match[1]}{BLOCKS[name]()}\n{match[4]}"

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    args = parser.parse_args(argv)
    stale = []
    for path in DOCUMENTS:
        text = path.read_text()
        new = rendered(text, path)
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(new)
    if stale and args.check:
        print(f"out of date with bench/results (run `python docs/render.py`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
