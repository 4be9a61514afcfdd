"""What every benchmark shares: command-line flags, the model variants with their LoRA adapters, timing that is
correct on CUDA, step peak memory, the machine's GEMM rate at the run's shapes, fresh worker processes, and
table/JSON output.

Variants are always measured interleaved in one process (round-robin over repeats, median per variant)
so that the load of whatever else runs on the machine hits all of them alike; compare ratios.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import DiffLlamaConfig, DiffLlamaForCausalLM, LlamaConfig, LlamaForCausalLM

from lmdiff_ft.model import LmDiffForCausalLM
from lmdiff_ft.model.convert import lmdiff_config_from_llama

from .naive_lmdiff import NaiveLmDiffForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).parent / "results"
MIB = 2**20

LORA_RANK = 16
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DIFF_ATTN_LORA_TARGETS = [*LLAMA_LORA_TARGETS, "q2_proj", "k2_proj"]
LMDIFF_LORA_TARGETS = [*DIFF_ATTN_LORA_TARGETS, "se_gate.fc1", "se_gate.fc2"]
LORA_TARGETS = {
    "lmdiff": LMDIFF_LORA_TARGETS,
    "lmdiff-attn": DIFF_ATTN_LORA_TARGETS,  # no SE gate to adapt
    "difflama": LLAMA_LORA_TARGETS,  # its differential attention runs on q/k/v/o alone
    "llama": LLAMA_LORA_TARGETS,
    "naive": LMDIFF_LORA_TARGETS,
}
# DiffLlama keeps its four λ vectors as bare parameters of the attention module, next to q/k/v/o: PEFT's
# modules_to_save works on whole modules, so it could only train the entire attention block. They are unfrozen
# after get_peft_model instead, which trains them as LM-Diff's saved `diff_lambda` is (PEFT does not save them).
DIFFLLAMA_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
VARIANTS = ("lmdiff", "lmdiff-attn", "difflama", "llama", "naive")
VARIANT_LABELS = {
    "lmdiff": "LM-Diff (ours)",
    "lmdiff-attn": "LM-Diff, diff. attention only (ours)",
    "difflama": "DiffLlama (transformers, sdpa)",
    "llama": "Llama (transformers, sdpa)",
    "naive": "LM-Diff naive reference",
}
# the LM-Diff switches that leave differential attention as the only component on (subln is off after
# conversion anyway): the architecture DiffLlama implements, so the two rows compare implementations
DIFF_ATTN_ONLY = dict(use_adaptive_norm=False, use_token_mixing=False, use_se_gate=False)
GEMM_MAX_TOKENS = 4096  # the GEMM probe's row cap: taller products add time to the probe, not rate


@dataclass(frozen=True)
class Dims:
    """Model dimensions; the defaults are one TinyLlama-1.1B layer, with fewer layers."""

    layers: int = 2
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000


def add_dims_args(parser: argparse.ArgumentParser) -> None:
    defaults = Dims()
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--intermediate", type=int, default=defaults.intermediate)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--kv-heads", type=int, default=defaults.kv_heads)
    parser.add_argument("--vocab", type=int, default=defaults.vocab)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_dims_args(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<script>.json)")


def dims_from_args(args: argparse.Namespace) -> Dims:
    return Dims(args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply --threads and check --device; returns the device and dtype to benchmark in."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch sees no CUDA device")
    return device, getattr(torch, args.dtype)


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine slows every variant, and small ops most."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def shared_config_fields(dims: Dims) -> dict:
    return dict(
        vocab_size=dims.vocab,
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_model(variant: str, dims: Dims, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised model. LM-Diff uses the config `lmdiff-ft convert` gives the same Llama (every
    component on, subln off): the model users fine-tune; `lmdiff-attn` the same with differential attention
    alone. DiffLlama supports SDPA (`_supports_sdpa`), so it runs on it like Llama. Random weights: the speed
    does not depend on them."""
    torch.manual_seed(0)
    llama_config = LlamaConfig(**shared_config_fields(dims), attn_implementation="sdpa")
    with device:
        if variant == "llama":
            model = LlamaForCausalLM(llama_config)
        elif variant == "difflama":
            model = DiffLlamaForCausalLM(DiffLlamaConfig(**shared_config_fields(dims), attn_implementation="sdpa"))
        elif variant == "lmdiff":
            model = LmDiffForCausalLM(lmdiff_config_from_llama(llama_config))
        elif variant == "lmdiff-attn":
            model = LmDiffForCausalLM(lmdiff_config_from_llama(llama_config, **DIFF_ATTN_ONLY))
        elif variant == "naive":
            model = NaiveLmDiffForCausalLM(lmdiff_config_from_llama(llama_config))
        else:
            raise ValueError(f"unknown variant {variant!r}, expected one of {VARIANTS}")
    # .to(device) too: DiffLlama draws its λ vectors with torch.normal(mean, std, size), which ignores the
    # device context and leaves them on the CPU
    return model.to(device=device, dtype=dtype)


def lora_config(variant: str) -> LoraConfig:
    """r=16 on the attention projections (LM-Diff: also q2/k2, and the SE gate where it has one); LM-Diff also
    trains λ as a saved module. DiffLlama's λ are unfrozen by `build_lora_model`."""
    saved = None if variant in ("llama", "difflama") else ["diff_lambda"]
    return LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=LORA_TARGETS[variant], modules_to_save=saved
    )


def build_lora_model(variant: str, dims: Dims, device: torch.device, dtype: torch.dtype) -> PeftModel:
    """The variant with its LoRA adapter; for DiffLlama also its λ vectors trainable (see DIFFLLAMA_LAMBDAS)."""
    model = get_peft_model(build_model(variant, dims, device, dtype), lora_config(variant))
    if variant == "difflama":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in DIFFLLAMA_LAMBDAS:
                param.requires_grad_(True)
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of fn(), with queued GPU work drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def gemm_shape(dims: Dims, tokens: int) -> tuple[int, int, int]:
    """The GEMM probe's (rows, inner, columns): the MLP's up projection of this many tokens, the model's largest
    per-layer weight product and the kind its FLOPs are mostly made of, with the rows capped. Sized from the run
    so that the rate is the one this step's products can reach, and tiny runs (tests; bf16 on a CPU without
    bf16 instructions, ~1 GFLOP/s) probe a tiny product."""
    return min(tokens, GEMM_MAX_TOKENS), dims.hidden, dims.intermediate


def gemm_flops(shape: tuple[int, int, int]) -> float:
    rows, inner, columns = shape
    return 2.0 * rows * inner * columns


def gemm_seconds(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int]) -> Callable[[], float]:
    """A timer of one activations × weightᵀ `torch.mm` of `shape`, as `nn.Linear` runs it: call it once per round,
    interleaved with the variants. On a GPU one product takes well under a millisecond, so it times a burst of
    them and divides."""
    rows, inner, columns = shape
    activations = torch.randn(rows, inner, device=device, dtype=dtype)
    weight = torch.randn(columns, inner, device=device, dtype=dtype)
    calls = 20 if device.type == "cuda" else 1
    torch.mm(activations, weight.t())  # warm-up: thread pool, cuBLAS handle

    def burst() -> None:
        for _ in range(calls):
            torch.mm(activations, weight.t())

    return lambda: time_call(burst, device) / calls


MEMORY_NOTE = {
    "cuda": "step peak = torch.cuda.max_memory_allocated during one training step minus memory allocated before it",
    "cpu": "step peak = process peak RSS (VmHWM, reset before the step) minus RSS before the step",
}


def _reset_peak_rss() -> bool:
    """Linux can reset the process's peak RSS (VmHWM) by writing 5 to /proc/self/clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _trim_heap() -> None:
    """Give freed heap pages back to the OS so that the baseline RSS holds only live tensors."""
    gc.collect()
    if platform.system() == "Linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _sampled_peak_rss(fn: Callable[[], object], interval_s: float = 0.001) -> int:
    """Fallback where VmHWM cannot be reset: sample RSS from a thread while fn runs."""
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], process.memory_info().rss)


def step_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory that one call of fn adds on top of what is already held (weights, optimizer state)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _trim_heap()
    before = psutil.Process().memory_info().rss
    if _reset_peak_rss():
        fn()
        return peak_rss() - before
    return _sampled_peak_rss(fn) - before


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of parameters, buffers, gradients and optimizer state: what stays allocated between steps."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(unique.values())


LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    """The commit measured, with "+changes" when the working tree differs from it (a result of uncommitted code)."""
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO_ROOT)  # noqa: E731
    head = run("rev-parse", "--short=12", "HEAD")
    if head.returncode != 0:
        return None
    dirty = run("status", "--porcelain", "--untracked-files=no", "--", "lmdiff_ft", "bench", "tasks").stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def portable(value: object) -> object:
    """A result as any clone can read it: absolute paths inside the repository made relative to it, and the home
    directory written as ~ (the measuring machine's own paths mean nothing elsewhere)."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item) for item in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        if path.is_relative_to(REPO_ROOT):
            return str(path.relative_to(REPO_ROOT))
        if path.is_relative_to(Path.home()):
            return "~/" + str(path.relative_to(Path.home()))
    return value


def machine_info(device: torch.device) -> dict:
    cpu_model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu_model = names[0] if names else cpu_model
    info = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average_1min": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return {**info, "versions": library_versions(), "commit": git_commit()}


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """rows of dicts; columns as (key, header). Floats print with 3 significant digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return "-" if value is None else str(value)

    table = [[header for _, header in columns]] + [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for i, line in enumerate(table):
        print("  ".join(text.rjust(width) for text, width in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * width for width in widths))


def run_worker(module: str, flags: list[str], what: str) -> dict:
    """`python -m module *flags` in a fresh interpreter from the repository root, so that its peak memory and
    whatever it patches are its own; its last line of output is its JSON result. A failure raises with the
    tail of the worker's stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", module, *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit status {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_json(script: str, args: argparse.Namespace, device: torch.device, payload: dict) -> Path:
    path = args.out or RESULTS_DIR / f"{script}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # the scripts that build their models from --layers, --hidden, ... record the dims
    dims = {"dims": asdict(dims_from_args(args))} if hasattr(args, "hidden") else {}
    document = {"machine": machine_info(device), **dims, "flags": vars(args), **payload}
    path.write_text(json.dumps(portable(document), indent=2) + "\n")
    return path
