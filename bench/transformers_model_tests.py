"""transformers' own generic causal-LM model tests on LM-Diff, with transformers' Llama as the control.

transformers checks every causal LM it ships with one shared suite: `CausalLMModelTest` in the repository's
`tests/causal_lm_tester.py`, which brings in `tests/test_modeling_common.py` (save/load, outputs, attention and
hidden-state outputs, gradient checkpointing, ...), `tests/generation/test_utils.py` (greedy, sampling, beam
search, caches, ...) and the pipeline, training, tensor-parallel and FSDP mixins. Passing it is what "behaves like
a transformers model" means in practice, so this script runs it against `LmDiffForCausalLM` and, as the control,
against `LlamaForCausalLM` at the same dimensions (hidden 32, 2 layers, 4 attention heads / 2 KV heads; LM-Diff
with every component on, `se_reduction=4`). A test that fails for LM-Diff but passes for Llama is LM-Diff's; one
that fails for both points at the environment or at the test tree.

None of transformers' test code lives in this project: the tests come from a transformers repository tree whose
path is the one required argument, best a checkout of the transformers repository at the tag of the installed
version (`git checkout v5.24.0` for transformers 5.24.0; the tests change with the library). The script writes a
test module with two tester/test class pairs (the pattern of the repository's
`tests/models/llama/test_modeling_llama.py`, nothing added beyond the model classes and the dimensions) into a
temporary directory and runs pytest on it once per model, in a subprocess whose working directory is that
temporary directory, with the tree first on `PYTHONPATH` (so `tests` is transformers' test package, not this
project's), the tree's `pyproject.toml` as pytest's configuration and its root `conftest.py` loaded as a plugin.
`HF_HUB_OFFLINE=1` and `OMP_NUM_THREADS=1` are set unless already set: nothing is downloaded (the pipeline tests,
which want Hub checkpoints, skip), and the models are too small for threads to pay while the FSDP tests start one
process per rank.

LM-Diff lives outside transformers, so the generated module gives it what an in-tree model has in transformers'
source: a row in each name table the suite uses to tell base models from heads (`MODEL_MAPPING_NAMES`,
`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, ...; `AutoModel.register` does not extend them, and without them the RoPE tests
skip and the training tests ask `LmDiffModel`, which has no head, for a loss), and a place on the allowlists of the
FSDP and tensor-parallel tests (Llama is put on both too). It also declares the one documented difference of its
cache (README, "Cache": keys and values stack both branches on the head axis) through the suite's own hook for
model-specific cache shapes, `_get_attention_shape`, and runs the two padding-free tests, which the suite skips for
every model flagged stateful, with that flag off (LM-Diff keeps it for assisted decoding, which its running sums
rule out; it packs).

It prints pass/fail/skip/error counts per model, the tests that fail for LM-Diff but pass for Llama, the tests
LM-Diff skips but Llama runs (with the skip reasons) and the tests that fail for both, and writes everything
(per-test outcomes, skip reasons, the first line of each failure, versions, the command) to
`bench/results/transformers_model_tests.json`. Needs `pytest`, `pytest-timeout`, and what the tree's test code
imports: `parameterized`, and `pytest-xdist` for its root `conftest.py` (`pip install -e ".[transformers-tests]"`).

    python -m bench.transformers_model_tests --transformers-tree /path/to/transformers [--keep-going] [-k EXPR]

About four minutes on two cores, most of it Llama's FSDP tests (two ranks each).
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from .common import REPO_ROOT, print_table, write_json

MODELS = ("lmdiff", "llama")
LABELS = {"lmdiff": "LM-Diff (ours)", "llama": "Llama (control)"}
TEST_CLASSES = {"lmdiff": "LmDiffModelTest", "llama": "LlamaModelTest"}
OUTCOME_PLUGIN_NAME = "lmdiff_outcome_log"  # a module in the temporary directory, the pytest runs' working directory
OUTCOMES = ("passed", "failed", "skipped", "error")
RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}  # which outcome wins when a test has several reports
# files the suite cannot import without; a tree missing one is not a repository tree
TREE_FILES = (
    "pyproject.toml",
    "tests/__init__.py",
    "tests/causal_lm_tester.py",
    "tests/test_modeling_common.py",
    "tests/generation/__init__.py",
    "tests/generation/test_utils.py",
)

# The generated module. Only what registers each model with the suite: its classes, its dimensions, and for LM-Diff
# what an in-tree model has in transformers' source (its rows in the name tables, its place on the allowlists of the
# distributed tests) and the one documented difference of its cache layout. Every flag of the test classes stays at
# the suite's default, so LM-Diff is judged by what the model class itself declares.
TEST_MODULE = '''\
"""Generated by bench/transformers_model_tests.py: transformers' CausalLMModelTest on LM-Diff and on Llama."""

import unittest
from unittest import mock

from tests import test_fsdp_mixin, test_tensor_parallel_mixin
from tests.causal_lm_tester import CausalLMModelTest, CausalLMModelTester
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.auto import modeling_auto

from lmdiff_ft.model import (
    LmDiffConfig,
    LmDiffForCausalLM,
    LmDiffForQuestionAnswering,
    LmDiffForSequenceClassification,
    LmDiffForTokenClassification,
    LmDiffModel,
)

# The suite tells base models from heads by transformers' own name tables, which `AutoModel.register` does not
# extend; an in-tree model has a row in each.
for table, name in (
    (modeling_auto.MODEL_MAPPING_NAMES, "LmDiffModel"),
    (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "LmDiffForCausalLM"),
    (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "LmDiffForSequenceClassification"),
    (modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES, "LmDiffForQuestionAnswering"),
    (modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, "LmDiffForTokenClassification"),
):
    table["lmdiff"] = name
# The distributed tests run for the model types on these allowlists (a CI budget). Both models go on both, so that
# LM-Diff's FSDP and tensor-parallel tests run, and Llama's too as their control.
FSDP_TYPES = test_fsdp_mixin.FSDP_DISTRIBUTED_TEST_MODEL_TYPES
for allowlist in (FSDP_TYPES, test_tensor_parallel_mixin.TP_DISTRIBUTED_TEST_MODEL_TYPES):
    if allowlist is not None:
        allowlist.update({"lmdiff", "llama"})

DIMS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
LMDIFF = {
    "use_diff_attn": True,
    "use_subln": True,
    "use_adaptive_norm": True,
    "use_token_mixing": True,
    "use_se_gate": True,
    "se_reduction": 4,
}


class LmDiffModelTester(CausalLMModelTester):
    config_class = LmDiffConfig
    base_model_class = LmDiffModel
    causal_lm_class = LmDiffForCausalLM
    sequence_classification_class = LmDiffForSequenceClassification
    question_answering_class = LmDiffForQuestionAnswering
    token_classification_class = LmDiffForTokenClassification

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **{**DIMS, **LMDIFF, **kwargs})


class LmDiffModelTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = LmDiffModelTester

    def _get_attention_shape(self, batch_size, seq_length, config):
        """README "Cache": keys and values hold both branches, stacked on the head axis ([k1; k2], [v; v]), as
        DeepSeek's entry in this suite declares its compressed latents."""
        heads = 2 * config.num_key_value_heads if config.use_diff_attn else config.num_key_value_heads
        shape = (batch_size, heads, seq_length, config.head_dim)
        return shape, shape

    # The suite skips its padding-free tests for every model flagged stateful ("non-transformer models most probably
    # have no packing support"). LM-Diff carries the flag because its running sums cannot be cropped (so no assisted
    # decoding), not for packing, which it supports: these run the suite's own tests with the flag off.
    def test_eager_padding_matches_padding_free_with_position_ids(self):
        with mock.patch.object(LmDiffForCausalLM, "_is_stateful", False):
            super().test_eager_padding_matches_padding_free_with_position_ids()

    def test_sdpa_padding_matches_padding_free_with_position_ids(self):
        with mock.patch.object(LmDiffForCausalLM, "_is_stateful", False):
            super().test_sdpa_padding_matches_padding_free_with_position_ids()


class LlamaModelTester(CausalLMModelTester):
    config_class = LlamaConfig
    base_model_class = LlamaModel
    causal_lm_class = LlamaForCausalLM

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **{**DIMS, **kwargs})


class LlamaModelTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = LlamaModelTester
'''

# pytest (9) reports unittest subtests on their own and folds their skips into the test's JUnit entry, so a test that
# ran and passed while some subtests skipped (a model class without the head it checks) reads as skipped there. This
# plugin, loaded into each pytest run, logs every report and whether it is a subtest's, so the outcome is the test's.
OUTCOME_PLUGIN = '''\
"""Generated by bench/transformers_model_tests.py: logs each test report, marking those of subtests."""

import json
import os


def pytest_runtest_logreport(report):
    record = {
        "name": report.nodeid.rsplit("::", 1)[-1],
        "when": report.when,
        "outcome": report.outcome,
        "subtest": type(report).__name__ == "SubtestReport",
    }
    with open(os.environ["LMDIFF_OUTCOME_LOG"], "a") as handle:
        handle.write(json.dumps(record) + "\\n")
'''

# printed in the child to check that `tests` is the tree's package and to record the versions the tests ran with
PROBE = (
    "import json, sys, tests, torch, transformers, pytest; "
    "print(json.dumps({'tests_package': tests.__file__, 'transformers': transformers.__version__, "
    "'torch': torch.__version__, 'pytest': pytest.__version__, 'python': sys.version.split()[0]}))"
)


def child_env(tree: Path) -> dict[str, str]:
    """The environment of the pytest runs: the tree first on the import path, no Hub access, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def check_tree(tree: Path, env: dict[str, str], cwd: Path) -> dict:
    """Fails early, with the reason, when the tree is not one the suite can run from."""
    missing = [name for name in TREE_FILES if not (tree / name).is_file()]
    if missing:
        sys.exit(f"{tree} is not a transformers repository tree: missing {', '.join(missing)}")
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"importing the tree's `tests` package failed:\n{probe.stderr[-3000:]}")
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    if not Path(info["tests_package"]).resolve().is_relative_to(tree):
        sys.exit(f"`tests` resolved to {info['tests_package']}, not to the tree's tests/ package")
    return info


def pytest_command(tree: Path, module: Path, model: str, junit: Path, args: argparse.Namespace) -> list[str]:
    """One model's pytest run: its test class of the generated module, the tree's configuration, JUnit XML out."""
    command = [
        sys.executable, "-m", "pytest", f"{module}::{TEST_CLASSES[model]}",
        "-c", str(tree / "pyproject.toml"), "--rootdir", str(tree),
        "-p", "no:cacheprovider", "-p", OUTCOME_PLUGIN_NAME,
        "--junitxml", str(junit), "-o", "log_cli=false", "-q", "--no-header", "-rN",
        "--timeout", str(args.timeout),
    ]  # fmt: skip
    if (tree / "conftest.py").is_file():
        # the tree's root conftest.py (markers, test-time patches), imported from PYTHONPATH: pytest would not find
        # it on its own, the generated module being outside the tree
        command += ["-p", "conftest"]
    if args.k:
        command += ["-k", args.k]
    return command


def first_line(text: str | None) -> str:
    """The first non-empty line of a failure or skip message: what fits in a table and a JSON field."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else ""


def parse_junit(path: Path) -> dict[str, dict]:
    """Test name -> worst outcome in the JUnit XML (error over failure over skip over pass) and the first line of the
    first failure (or error) message and of the first skip reason."""
    tests: dict[str, dict] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = tests.setdefault(case.get("name", ""), {"outcome": "passed", "failure": "", "skip": ""})
        for child in case:
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(child.tag)
            if outcome is None:
                continue
            if RANK[outcome] > RANK[test["outcome"]]:
                test["outcome"] = outcome
            key = "skip" if outcome == "skipped" else "failure"
            test[key] = test[key] or first_line(child.get("message") or child.text)
    return tests


def logged_outcomes(path: Path) -> dict[str, str]:
    """Test name -> outcome from the reports OUTCOME_PLUGIN logged: error when setup or teardown failed, failed when
    the test or one of its subtests failed, skipped when the test itself skipped or every one of its subtests did
    (it then checked nothing: `skipTest` inside `subTest` skips only that subtest), else passed."""
    outcomes: dict[str, str] = {}
    subtests: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        report = json.loads(line)
        name = report["name"]
        current = outcomes.setdefault(name, "passed")
        if report["subtest"]:
            subtests.setdefault(name, set()).add(report["outcome"])
        if report["outcome"] == "failed":
            outcome = "failed" if report["when"] == "call" else "error"
        elif report["outcome"] == "skipped" and not report["subtest"]:
            outcome = "skipped"
        else:
            continue
        if RANK[outcome] > RANK[current]:
            outcomes[name] = outcome
    for name, seen in subtests.items():
        if outcomes[name] == "passed" and seen == {"skipped"}:
            outcomes[name] = "skipped"
    return outcomes


def collect_results(junit: Path, outcome_log: Path) -> dict[str, dict]:
    """Test name -> outcome (from the report log when there is one, else from the XML) and message: the failure's
    first line for a failed test, the skip reason for a skipped one."""
    xml = parse_junit(junit) if junit.exists() else {}
    logged = logged_outcomes(outcome_log) if outcome_log.exists() else {}
    results = {}
    for name in sorted(set(xml) | set(logged)):
        entry = xml.get(name, {"outcome": "passed", "failure": "", "skip": ""})
        outcome = logged.get(name, entry["outcome"])
        message = entry["skip"] if outcome == "skipped" else entry["failure"] if outcome != "passed" else ""
        results[name] = {"outcome": outcome, "message": message}
    return results


def run_model(model: str, command: list[str], workdir: Path, env: dict[str, str], junit: Path) -> dict:
    """Runs one model's tests; pytest's own output goes to a log file, whose tail is printed if the run breaks."""
    log, outcome_log = workdir / f"{model}.log", workdir / f"{model}.outcomes.jsonl"
    print(f"running {LABELS[model]}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        run_env = {**env, "LMDIFF_OUTCOME_LOG": str(outcome_log)}
        returncode = subprocess.run(
            command, cwd=workdir, env=run_env, stdout=handle, stderr=subprocess.STDOUT
        ).returncode
    seconds = time.perf_counter() - start
    # pytest: 0 all passed, 1 some failed; anything else (interrupted, internal error, usage error, nothing
    # collected) means the run itself did not complete
    completed = returncode in (0, 1) and junit.exists()
    if not completed:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        print(f"pytest exited with {returncode} for {LABELS[model]}; last lines of its output:\n{tail}", flush=True)
    tests = collect_results(junit, outcome_log)
    counts = {outcome: sum(test["outcome"] == outcome for test in tests.values()) for outcome in OUTCOMES}
    print(f"  {LABELS[model]}: {counts} in {seconds:.0f} s", flush=True)
    return {
        "returncode": returncode,
        "completed": completed,
        "seconds": round(seconds, 1),
        "counts": counts,
        "command": command,
        "tests": tests,
    }


def compare(lmdiff: dict[str, dict], llama: dict[str, dict]) -> dict[str, list[dict]]:
    """The per-test differences that matter: what LM-Diff breaks, skips or passes where the control does not."""
    bad = ("failed", "error")
    diffs: dict[str, list[dict]] = {
        "lmdiff_fails_llama_passes": [],
        "lmdiff_skips_llama_runs": [],
        "both_fail": [],
        "llama_fails_lmdiff_passes": [],
        "lmdiff_runs_llama_skips": [],
        "only_one_model_ran": [],
    }
    for name in sorted(set(lmdiff) | set(llama)):
        ours, control = lmdiff.get(name), llama.get(name)
        if ours is None or control is None:
            diffs["only_one_model_ran"].append({"test": name, "lmdiff": ours, "llama": control})
            continue
        row = {"test": name, "lmdiff": ours["outcome"], "llama": control["outcome"]}
        if ours["outcome"] in bad and control["outcome"] == "passed":
            diffs["lmdiff_fails_llama_passes"].append({**row, "message": ours["message"]})
        elif ours["outcome"] == "skipped" and control["outcome"] != "skipped":
            diffs["lmdiff_skips_llama_runs"].append({**row, "reason": ours["message"]})
        elif ours["outcome"] in bad and control["outcome"] in bad:
            diffs["both_fail"].append({**row, "message": ours["message"], "llama_message": control["message"]})
        elif control["outcome"] in bad and ours["outcome"] == "passed":
            diffs["llama_fails_lmdiff_passes"].append({**row, "message": control["message"]})
        elif control["outcome"] == "skipped" and ours["outcome"] != "skipped":
            diffs["lmdiff_runs_llama_skips"].append({**row, "reason": control["message"]})
    return diffs


def print_report(runs: dict[str, dict], diffs: dict[str, list[dict]]) -> None:
    """The counts table, then each non-empty difference list, one test a line."""
    rows = [{"model": LABELS[model], **run["counts"], "seconds": run["seconds"]} for model, run in runs.items()]
    print()
    print_table(rows, [("model", "model"), *((o, o) for o in OUTCOMES), ("seconds", "seconds")])
    sections = (
        ("lmdiff_fails_llama_passes", "fail (or error) for LM-Diff, pass for Llama", "message"),
        ("lmdiff_skips_llama_runs", "skipped for LM-Diff, run for Llama (LM-Diff's skip reason)", "reason"),
        ("both_fail", "fail for both", "message"),
        ("llama_fails_lmdiff_passes", "fail for Llama, pass for LM-Diff", "message"),
        ("lmdiff_runs_llama_skips", "skipped for Llama, run for LM-Diff (Llama's skip reason)", "reason"),
    )
    for key, title, detail in sections:
        if diffs.get(key):
            print(f"\n{title} ({len(diffs[key])}):")
            for row in diffs[key]:
                outcome = f" [{row['lmdiff']}/{row['llama']}]" if key != "lmdiff_skips_llama_runs" else ""
                print(textwrap.shorten(f"  {row['test']}{outcome}: {row[detail]}", width=200, placeholder=" ..."))
    if diffs.get("only_one_model_ran"):
        print(f"\nreported for one model only: {', '.join(row['test'] for row in diffs['only_one_model_ran'])}")


def git_state() -> dict:
    """The project commit the results belong to, and whether the model code had uncommitted changes then."""

    def git(*arguments: str) -> str:
        result = subprocess.run(["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    return {"head": git("rev-parse", "HEAD"), "lmdiff_ft_uncommitted": bool(git("status", "--porcelain", "lmdiff_ft"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--transformers-tree",
        type=Path,
        required=True,
        help="a transformers repository tree (a checkout at the installed version's tag)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="run LM-Diff even when the Llama control run does not complete (pytest crashed, "
        "nothing collected), and report what there is",
    )
    parser.add_argument("-k", metavar="EXPR", help="pytest -k expression, applied to both models")
    parser.add_argument("--timeout", type=int, default=900, help="per-test timeout in seconds (pytest-timeout)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/transformers_model_tests.json)")
    args = parser.parse_args(argv)
    tree = args.transformers_tree.expanduser().resolve()
    started = datetime.datetime.now(datetime.timezone.utc)
    project = git_state()  # before the runs: the model code they import may be edited while they go

    with tempfile.TemporaryDirectory(prefix="lmdiff-transformers-tests-") as tmp:
        workdir = Path(tmp)
        env = child_env(tree)
        versions = check_tree(tree, env, workdir)
        print(f"transformers {versions['transformers']}, torch {versions['torch']}, tests from {tree / 'tests'}")
        module = workdir / "test_lmdiff_vs_llama.py"
        module.write_text(TEST_MODULE)
        (workdir / f"{OUTCOME_PLUGIN_NAME}.py").write_text(OUTCOME_PLUGIN)
        runs: dict[str, dict] = {}
        # the control first: if the tree cannot run Llama's tests, LM-Diff's results would say nothing
        for model in ("llama", "lmdiff"):
            junit = workdir / f"{model}.xml"
            runs[model] = run_model(model, pytest_command(tree, module, model, junit, args), workdir, env, junit)
            if not runs[model]["completed"] and not args.keep_going:
                print("stopping (--keep-going runs the rest anyway); nothing written", file=sys.stderr)
                return 1

    diffs = compare(runs["lmdiff"]["tests"], runs["llama"]["tests"])
    print_report({model: runs[model] for model in MODELS}, diffs)
    payload = {
        "command": shlex.join(
            ["python", "-m", "bench.transformers_model_tests", *(sys.argv[1:] if argv is None else argv)]
        ),
        "transformers_tree": str(tree),
        "versions": versions,
        "env": {key: env[key] for key in ("HF_HUB_OFFLINE", "OMP_NUM_THREADS")},
        "project": project,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "counts": {model: runs[model]["counts"] for model in MODELS},
        "differences": diffs,
        "runs": {model: runs[model] for model in MODELS},
    }
    path = write_json("transformers_model_tests", args, torch.device("cpu"), payload)
    print(f"\nwrote {path}")
    return 0 if all(run["completed"] for run in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
