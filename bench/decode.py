"""Greedy decoding speed with `generate`: per-token time after a prompt of 32, 512 and 2048 tokens, for our
LM-Diff and transformers' Llama, with the cache (per-token cost should stay flat as the context grows)
and without it (every token re-runs the whole sequence).

    python -m bench.decode [--contexts 32 512 2048] [--new-tokens 16] [--no-cache-tokens 3]
    python -m bench.decode --device cuda --dtype bfloat16

Per-token times come from a stopping criterion that stamps the clock after every generated token; the
first token (which includes the prefill) is reported apart as the prefill time.
"""

import argparse
import time

import torch
from transformers import StoppingCriteria

from .common import (
    VARIANT_LABELS,
    add_common_args,
    build_model,
    dims_from_args,
    load_average,
    median,
    print_table,
    setup,
    synchronize,
    write_json,
)

DECODE_VARIANTS = ("lmdiff", "llama")


class TokenClock(StoppingCriteria):
    """Records the time after each generation step; never stops generation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def time_generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> dict:
    """Prefill seconds and the per-token seconds of every later step of one greedy `generate`."""
    clock = TokenClock(prompt.device)
    synchronize(prompt.device)
    start = time.perf_counter()
    model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
        stopping_criteria=[clock],
    )
    steps = [later - earlier for earlier, later in zip(clock.stamps, clock.stamps[1:], strict=False)]
    return {"prefill_s": clock.stamps[0] - start, "token_s": steps}


def measure(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Every round runs every (context, cache mode, variant) once, so ratios can be taken within a round."""
    dims = dims_from_args(args)
    models = {variant: build_model(variant, dims, device, dtype).eval() for variant in DECODE_VARIANTS}
    modes = [(True, args.new_tokens)] + ([(False, args.no_cache_tokens)] if args.no_cache_tokens > 1 else [])
    prompts = {context: torch.randint(3, dims.vocab, (1, context), device=device) for context in args.contexts}
    cases = [(context, use_cache, new_tokens) for context in args.contexts for use_cache, new_tokens in modes]
    for context, use_cache, _ in cases:
        for model in models.values():
            time_generate(model, prompts[context], 2, use_cache)  # warm-up
    runs = {(variant, context, use_cache): [] for variant in models for context, use_cache, _ in cases}
    for _ in range(args.repeats):
        for context, use_cache, new_tokens in cases:
            for variant, model in models.items():
                runs[variant, context, use_cache].append(time_generate(model, prompts[context], new_tokens, use_cache))

    shortest = min(args.contexts)
    rows = []
    for (variant, context, use_cache), variant_runs in runs.items():
        token_s = [median(run["token_s"]) for run in variant_runs]  # per round
        at_shortest = [median(run["token_s"]) for run in runs[variant, shortest, use_cache]]
        row = {
            "variant": variant,
            "label": VARIANT_LABELS[variant],
            "context": context,
            "cache": use_cache,
            "prefill_s": median([run["prefill_s"] for run in variant_runs]),
            "token_ms": 1e3 * median(token_s),
            "tokens_per_s": 1.0 / median(token_s),
            "vs_shortest_context": median([t / t0 for t, t0 in zip(token_s, at_shortest, strict=True)]),
            "runs": variant_runs,
        }
        if variant != "lmdiff":
            ours = [median(run["token_s"]) for run in runs["lmdiff", context, use_cache]]
            row["lmdiff_speed_ratio"] = median([t / t_ours for t, t_ours in zip(token_s, ours, strict=True)])
        rows.append(row)
    rows.sort(key=lambda row: (row["context"], not row["cache"]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 512, 2048])
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per timed run with the cache")
    parser.add_argument(
        "--no-cache-tokens", type=int, default=3, help="tokens per run without the cache (< 2 skips that mode)"
    )
    args = parser.parse_args(argv)
    device, dtype = setup(args)

    load_before = load_average()
    rows = measure(args, device, dtype)
    print(f"Greedy decoding, batch 1, {args.dtype} on {device}, {dims_from_args(args)}")
    print_table(
        rows,
        [
            ("label", "variant"),
            ("context", "context"),
            ("cache", "cache"),
            ("prefill_s", "prefill s"),
            ("token_ms", "ms/token"),
            ("tokens_per_s", "tokens/s"),
            ("vs_shortest_context", "x ms/token at shortest context"),
            ("lmdiff_speed_ratio", "LM-Diff speed x"),
        ],
    )
    print("\nms/token: median over rounds of each run's median step after the first (which includes the prefill).")
    print("Ratios are taken within each round (all contexts and variants run once per round), then the median:")
    print("x ms/token at shortest context = this ms/token / the same variant's at the shortest context;")
    print("LM-Diff speed x = LM-Diff tokens/s / Llama tokens/s, same context and cache mode.")
    print(f"1-minute load average before/after: {load_before} / {load_average()}.")
    payload = {"load_average": {"before": load_before, "after": load_average()}, "rows": rows}
    print(f"wrote {write_json('decode', args, device, payload)}")


if __name__ == "__main__":
    main()
