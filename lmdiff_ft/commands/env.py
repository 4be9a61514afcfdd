"""`lmdiff-ft env`: what a bug report needs first. Library versions, the machine, its devices, and whether
4-bit quantization actually runs here (importing bitsandbytes is not enough: its kernels may be missing)."""

import importlib.metadata
import json
import os
import platform
import sys

import torch

from ..integrations.accelerate import default_config_file

PACKAGES = ("lmdiff-ft", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "deepspeed")
DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_count() -> int:
    """CPUs this process may use (a container or `taskset` often allows fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cuda_devices() -> list[dict]:
    devices = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    return devices


def bf16_supported(device: torch.device) -> bool:
    """On CUDA: native bf16 (Ampere or newer). On CPU bf16 always runs, but emulated and slow."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def accelerate_default_config() -> str | None:
    """`accelerate launch` without --config_file silently uses this file when it exists."""
    path = default_config_file()
    return str(path) if path.is_file() else None


def check_4bit(device: torch.device, dtype: torch.dtype) -> dict:
    """Quantize a small Linear to NF4 on `device`, run forward and backward, compare with the full-precision
    output. NF4 of a random matrix is about 10% off in relative norm; far more means broken kernels."""
    result = {"device": str(device), "compute_dtype": str(dtype).removeprefix("torch.")}
    try:
        import bitsandbytes as bnb

        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(128, 128, generator=generator) / 128**0.5
        layer = bnb.nn.Linear4bit(128, 128, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(4, 128, generator=generator).to(device, dtype).requires_grad_(True)
        y = layer(x)
        y.float().sum().backward()
        reference = x.detach().float() @ weight.to(device).T
        error = ((y.detach().float() - reference).norm() / reference.norm()).item()
        quantized = getattr(layer.weight, "bnb_quantized", False) and layer.weight.dtype == torch.uint8
        works = quantized and error < 0.25 and bool(torch.isfinite(x.grad).all())
        result.update(works=works, relative_error=round(error, 4))
        if not works:
            result["error"] = "weights not quantized" if not quantized else f"output off by {error:.0%}"
    except Exception as exc:  # a missing package, a missing native library, a kernel for another GPU: all "no"
        message = str(exc).strip().splitlines()
        result.update(works=False, error=exc.__class__.__name__ + (f": {message[0]}" if message else ""))
    return result


def collect() -> dict:
    from ..base.loading import choose_dtype, default_device

    device = default_device()
    return {
        "versions": {"python": platform.python_version(), **{name: package_version(name) for name in PACKAGES}},
        "torch_cuda": torch.version.cuda,
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "cpu_count": cpu_count(),
        "cuda_devices": cuda_devices(),
        "mps_available": torch.backends.mps.is_available(),
        "default_device": str(device),
        "bf16": bf16_supported(device),
        "distributed_backends": [
            name
            for name, available in (
                ("nccl", torch.distributed.is_available() and torch.distributed.is_nccl_available()),
                ("gloo", torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                ("mpi", torch.distributed.is_available() and torch.distributed.is_mpi_available()),
            )
            if available
        ],
        "distributed_env": {name: os.environ[name] for name in DISTRIBUTED_VARIABLES if name in os.environ},
        "accelerate_default_config": accelerate_default_config(),
        "4bit": check_4bit(device, choose_dtype("auto", device)),
    }


def rows(info: dict) -> list[tuple[str, str]]:
    """The report as (key, value) rows, the order a reader scans it in."""
    out = [(name, version or "not installed") for name, version in info["versions"].items()]
    out.append(("torch CUDA build", info["torch_cuda"] or "none (CPU build)"))
    out += [("platform", info["platform"]), ("CPUs usable", str(info["cpu_count"]))]
    for device in info["cuda_devices"]:
        out.append(
            (f"cuda:{device['index']}", f"{device['name']}, {device['memory_gib']} GiB, sm {device['capability']}")
        )
    if not info["cuda_devices"]:
        out.append(("CUDA devices", "none" + (" (MPS available, unused)" if info["mps_available"] else "")))
    out.append(("training device", info["default_device"]))
    cpu_note = " (emulated on CPU, slow: CPU runs use float32)" if info["default_device"] == "cpu" else ""
    out.append(("bf16", ("yes" if info["bf16"] else "no (float16 is used)") + cpu_note))
    out.append(("distributed backends", ", ".join(info["distributed_backends"]) or "none"))
    for name, value in info["distributed_env"].items():
        out.append((name, value))
    out.append(("accelerate default config", info["accelerate_default_config"] or "none"))
    four = info["4bit"]
    if four["works"]:
        verdict = f"works (NF4 on {four['device']}, {four['compute_dtype']}, rel. error {four['relative_error']})"
    else:
        verdict = f"does NOT work on {four['device']}: {four['error']}"
    out.append(("4-bit (bitsandbytes)", verdict))
    return out


def print_environment(as_json: bool = False) -> None:
    info = collect()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lmdiff-ft env", show_header=False, caption="paste this into bug reports")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows(info):
        table.add_row(key, value)
    Console().print(table)
