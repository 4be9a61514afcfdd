"""Memory and time of loading a TinyLlama-sized LM-Diff base (nf4, int8, none) and of one QLoRA training step on it,
through transformers' stock loader and our streaming one, each variant in a fresh process.

    python -m bench.qlora_memory [--layers 22] [--seq-len 256] [--variants nf4-stock ...] [--malloc pinned glibc]

Every variant runs under two allocator policies: glibc's default, and the 128 KiB mmap threshold that
`load_base` pins for CPU runs on checkpoints over 1 GiB (`loading.pin_malloc_mmap_threshold`).

The random checkpoint (fp32 safetensors, one shard per decoder layer, as `save_pretrained` lays out a sharded
checkpoint) is written once under runs/bench/, one layer at a time, so building it never holds the model;
bench/dpo_memory.py builds its own with the same function.

Peak RSS is the process's VmHWM, which is what ru_maxrss reports too, except that Linux carries the parent's
peak over into a child's ru_maxrss across fork + exec. It counts every resident page, including the pages of
mmapped files: a memory-mapped checkpoint shows up in it as it is read (clean page-cache pages, which the kernel
could drop under pressure). A sampler thread therefore also records the anonymous (RssAnon) and file-backed
(RssFile, about 0.13 GB of it shared libraries) peaks. The unquantized base loads lazily (zero-copy mmap), so its
pages are read, and its load time spent, during the step.
"""

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import lmdiff_ft  # noqa: F401  (registers the lmdiff model type)
from lmdiff_ft.model import LmDiffConfig
from lmdiff_ft.model.modeling_lmdiff import LmDiffDecoderLayer
from lmdiff_ft.outputs import atomic_output_dir

from .common import REPO_ROOT, Dims, machine_info, portable, print_table, run_worker

RESULTS_FILE = Path(__file__).parent / "results" / "qlora_memory.json"
CHECKPOINT_ROOT = REPO_ROOT / "runs" / "bench"
GB = 1e9
VARIANTS = ("nf4-stock", "nf4-streaming", "int8-stock", "int8-streaming", "none-stock")
MALLOC_POLICIES = ("pinned", "glibc")
LORA_RANK = 16
PRESETS = ("diff_attn", "lambda", "se_gate")  # what the committed results were measured with


def checkpoint_dir(dims: Dims) -> Path:
    """runs/bench/tinyllama-dims-lmdiff-<layers>l at TinyLlama's layer shape (the default Dims), else named by dims."""
    if dims == Dims(layers=dims.layers):
        return CHECKPOINT_ROOT / f"tinyllama-dims-lmdiff-{dims.layers}l"
    shape = f"h{dims.hidden}-i{dims.intermediate}-a{dims.heads}-kv{dims.kv_heads}-v{dims.vocab}"
    return CHECKPOINT_ROOT / f"lmdiff-{dims.layers}l-{shape}"


def build_checkpoint(out: Path, dims: Dims) -> None:
    """A random LM-Diff (every component on, PyTorch's default init) in fp32, written one decoder layer per shard
    so that at most one layer is ever in memory."""
    config = LmDiffConfig(
        num_hidden_layers=dims.layers,
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        vocab_size=dims.vocab,
        max_position_embeddings=2048,
    )
    layers = dims.layers
    shards = layers + 1
    weight_map = {}
    total = 0
    with atomic_output_dir(out, overwrite=True) as tmp:

        def write_shard(number: int, tensors: dict[str, torch.Tensor]) -> None:
            nonlocal total
            name = f"model-{number:05d}-of-{shards:05d}.safetensors"
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())

        for i in range(layers):
            torch.manual_seed(i)
            layer = LmDiffDecoderLayer(config, i).state_dict()
            write_shard(i + 1, {f"model.layers.{i}.{key}": tensor.contiguous() for key, tensor in layer.items()})
        generator = torch.Generator().manual_seed(layers)
        write_shard(
            shards,
            {
                "model.embed_tokens.weight": torch.randn(config.vocab_size, config.hidden_size, generator=generator)
                * config.initializer_range,
                "model.norm.weight": torch.ones(config.hidden_size),
                "lm_head.weight": torch.randn(config.vocab_size, config.hidden_size, generator=generator)
                * config.initializer_range,
            },
        )
        config.save_pretrained(tmp)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class MemorySampler:
    """Peak anonymous and file-backed RSS, sampled from /proc/self/status by a background thread."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_anon = self.peak_file = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    def _run(self) -> None:
        while not self._done.is_set():
            fields = self.now()
            self.peak_anon = max(self.peak_anon, fields["RssAnon"])
            self.peak_file = max(self.peak_file, fields["RssFile"])
            time.sleep(self.interval_s)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def load(variant: str, path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from lmdiff_ft.base.quantization import quantization_config
    from lmdiff_ft.base.streaming import load_quantized_streaming

    quantization, loader = variant.split("-")
    if loader == "streaming":
        return load_quantized_streaming(path, quantization, torch.float32, "cpu")
    config = quantization_config(quantization, torch.float32)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=config, device_map={"": "cpu"}
    )


def measure(variant: str, malloc: str, path: Path, seq_len: int) -> dict:
    """Load, attach the adapter presets with gradient checkpointing, one AdamW step; all in this process."""
    from lmdiff_ft.adapters.presets import attach_adapters
    from lmdiff_ft.integrations.glibc import pin_malloc_mmap_threshold
    from lmdiff_ft.schema.task import AdapterConfig

    if malloc == "pinned":
        pin_malloc_mmap_threshold()
    with MemorySampler() as sampler:
        start = MemorySampler.now()
        started = time.perf_counter()
        model = load(variant, path)
        load_s = time.perf_counter() - started
        after_load = MemorySampler.now()
        load_peak = after_load["VmHWM"]
        footprint = model.get_memory_footprint()

        adapter = AdapterConfig(presets=list(PRESETS), r=LORA_RANK, alpha=2 * LORA_RANK)
        model = attach_adapters(model, adapter, gradient_checkpointing=True)
        # what the Trainer does with gradient_checkpointing=True; prepare_model_for_kbit_training already did it
        # for the quantized bases, attach_adapters leaves it to the trainer on a full-precision one
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        tokens = torch.randint(3, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
        started = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - started
        after_step = MemorySampler.now()
    return {
        "variant": variant,
        "malloc": malloc,
        "footprint_gb": footprint / GB,
        "peak_rss_gb": after_step["VmHWM"] / GB,
        "ru_maxrss_gb": ru_maxrss() / GB,
        "load_peak_rss_gb": load_peak / GB,
        "peak_anon_gb": sampler.peak_anon / GB,
        "peak_file_gb": sampler.peak_file / GB,
        "rss_after_load_gb": after_load["VmRSS"] / GB,
        "file_rss_after_load_gb": after_load["RssFile"] / GB,
        "rss_after_step_gb": after_step["VmRSS"] / GB,
        "rss_at_start_gb": start["VmRSS"] / GB,
        "load_s": load_s,
        "step_s": step_s,
        "loss": loss.item(),
        "trainable_params": trainable,
    }


def run_variant(variant: str, malloc: str, path: Path, seq_len: int) -> dict:
    """One variant in a fresh interpreter, so that its peak RSS is its own."""
    flags = ["--worker", variant, "--malloc", malloc, "--seq-len", str(seq_len), "--checkpoint", str(path)]
    return run_worker("bench.qlora_memory", flags, f"{variant} ({malloc} malloc)")


COLUMNS = [
    ("variant", "variant"),
    ("malloc", "malloc"),
    ("footprint_gb", "footprint GB"),
    ("peak_rss_gb", "peak RSS GB"),
    ("peak_anon_gb", "peak anon GB"),
    ("peak_file_gb", "peak file GB"),
    ("load_peak_rss_gb", "load peak GB"),
    ("rss_after_step_gb", "RSS after step GB"),
    ("load_s", "load s"),
    ("step_s", "step s"),
    ("trainable_params", "trainable"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--malloc", nargs="+", choices=MALLOC_POLICIES, default=list(MALLOC_POLICIES))
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.malloc[0], args.checkpoint, args.seq_len)))
        return

    path = checkpoint_dir(Dims(layers=args.layers))
    if not (path / "config.json").is_file():
        print(f"writing a random {args.layers}-layer checkpoint to {path}")
        build_checkpoint(path, Dims(layers=args.layers))
    rows = []
    for malloc in args.malloc:
        for variant in args.variants:
            rows.append(run_variant(variant, malloc, path, args.seq_len))
            print(f"{variant} ({malloc} malloc): peak RSS {rows[-1]['peak_rss_gb']:.2f} GB", flush=True)
    print_table(rows, COLUMNS)
    peaks = {(row["variant"], row["malloc"]): row["peak_rss_gb"] for row in rows}
    ratios = {
        f"{variant} / none-stock, {malloc} malloc": peaks[variant, malloc] / peaks["none-stock", malloc]
        for malloc in args.malloc
        for variant in ("nf4-stock", "nf4-streaming")
        if (variant, malloc) in peaks and ("none-stock", malloc) in peaks
    }
    for name, ratio in ratios.items():
        print(f"peak RSS {name}: {ratio:.0%} (goal for nf4: <= 40%)")
    checkpoint_gb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / GB
    document = {
        "machine": machine_info(torch.device("cpu")),
        "command": " ".join(["python -m bench.qlora_memory", *sys.argv[1:]]),
        "checkpoint": {"path": str(path), "layers": args.layers, "dtype_on_disk": "float32", "gb": checkpoint_gb},
        "seq_len": args.seq_len,
        "batch": 1,
        "lora_rank": LORA_RANK,
        "rows": rows,
        "peak_ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(portable(document), indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
