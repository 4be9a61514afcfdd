"""The side-by-side engine behind `lmdiff-ft app`: one base in memory, every run's adapter on it by name.

A run directory (what `lmdiff-ft sft` writes) is served as a column: the base is loaded once, quantized as
the runs' task said, and each adapter joins it as a named PEFT adapter. A column generates with its adapter
active (`set_adapter`), the base column with adapters disabled, from the same prompt ids and the same seed,
so two columns differ only by their weights. The inspection helpers show where: λ per layer, the SE gate's
mean activation and the differential attention map A1 − λ·A2 of one head, as the model itself returns it.

No Gradio here: the app (`app.py`) and the tests drive this module directly. Runs and their prompts are in
`runs.py`, votes in `votes.py`.
"""

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..adapters.known_base import load_adapter
from ..base.loading import LoadedBase, load_base, load_tokenizer
from ..errors import UserError
from ..evaluation.generation import generation_settings, render_prompt
from ..outputs import COMPLETION_MARKER
from .runs import BASE, RunInfo, adapter_name, discover_runs, example_prompts, is_finished, read_run, task_prompt
from .settings import DEFAULT_LIMITS, GenerationSettings, Limits

# --- generation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partial:
    """A column's answer so far, with its speed."""

    text: str
    tokens: int
    first_token_s: float | None  # latency: from the start of the column's generation to its first token
    elapsed_s: float

    def stats(self) -> str:
        speed = self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
        first = f"{self.first_token_s:.2f} s" if self.first_token_s is not None else "–"
        return f"{self.tokens} tokens · {speed:.1f} tokens/s · first token {first} · total {self.elapsed_s:.2f} s"


class _TokenSink(BaseStreamer):
    """What `generate` streams into: the prompt once (skipped), then each new token, then the end (None)."""

    def __init__(self):
        self.queue: SimpleQueue = SimpleQueue()
        self.prompt_seen = False
        self.started = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.queue.put((value.reshape(-1).tolist(), time.perf_counter()))
        self.prompt_seen = True

    def end(self) -> None:
        self.queue.put(None)


class _StopWhenSet(StoppingCriteria):
    """Ends a generation whose reader went away (a closed browser tab), so it frees the model at once."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


# --- inspection ----------------------------------------------------------------------------------------


@dataclass
class Inspection:
    """Why a column answers as it does, on one prompt: λ and the SE gate per layer, and one head's map."""

    tokens: list[str]
    lambdas: list[float]  # per layer
    se_gate: list[float]  # mean of 2·sigmoid(fc2(...)) over the prompt's tokens and channels, per layer
    layer: int
    head: int
    diff_map: torch.Tensor  # A1 − λ·A2 [T, T]: what mixes the values (each row sums to 1 − λ)


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Only eager attention returns the maps (SDPA never forms them); generation goes back to the previous one."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# --- the engine ----------------------------------------------------------------------------------------


class Comparer:
    """One base, many adapters: columns generate in turn on the same weights in memory."""

    def __init__(self, base: LoadedBase, roots: Sequence[Path], limits: Limits = DEFAULT_LIMITS):
        self.base = base
        self.model: torch.nn.Module = base.model.eval()  # a PeftModel once the first adapter is added
        self.roots = [Path(r).resolve() for r in roots]
        self.limits = limits
        self.runs: dict[str, RunInfo] = {}
        self.tokenizers: dict[str, PreTrainedTokenizerBase] = {BASE: base.tokenizer}
        self._lock = threading.RLock()  # PEFT's active adapter is global state: one user of the model at a time

    @classmethod
    def from_runs(
        cls,
        roots: Sequence[Path],
        base: str | None = None,
        quantization: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> tuple["Comparer", list[str]]:
        """Load the base the first run was trained on (or `base`) once, then every run's adapter on it.
        Runs that cannot be served are left out, each with a one-line reason."""
        runs, problems = discover_runs(roots)
        if base is None and not runs:
            shown = ", ".join(map(str, roots))
            raise UserError(f"no finished run under {shown} (train one: lmdiff-ft sft TASK.yaml), and no --base")
        task = runs[0].task if runs else None
        loaded = load_base(
            base or task.base.path,
            quantization or (task.quantization if task else "auto"),
            task.dtype if task else "auto",
            task.base.convert_from_llama if task else False,
            task.base.seed if task else 0,
            plain_llama=task.base.plain_llama if task else False,
        )
        comparer = cls(loaded, roots, limits)
        for run in runs:
            try:
                comparer.add(run)
            except UserError as exc:
                problems.append(str(exc))
        return comparer, problems

    # -- adapters --

    def add(self, run: RunInfo) -> RunInfo:
        """Add a run's adapter under its name, if it was made for this base."""
        if run.fingerprint != self.base.fingerprint:
            raise UserError(
                f"{run.path}: made for base {run.base_info.get('base')} (fingerprint {run.fingerprint}); "
                f"this app serves {self.base.path} (fingerprint {self.base.fingerprint}); start another app for it"
            )
        with self._lock:
            try:
                self.model = load_adapter(self.model, run.path, self.base.fingerprint, adapter_name=run.name)
            except UserError:
                raise
            except Exception as exc:  # a corrupt or foreign file: PEFT/safetensors errors vary
                raise UserError(f"{run.path}: the adapter failed to load ({type(exc).__name__}: {exc})") from exc
        self.tokenizers[run.name] = load_tokenizer(run.path)
        self.runs[run.name] = run
        return run

    def add_run(self, directory: str | Path) -> RunInfo:
        """Serve one more run directory; only directories inside the app's roots are served."""
        path = Path(directory).expanduser().resolve()
        if not any(path.is_relative_to(root) for root in self.roots):
            served = ", ".join(map(str, self.roots))
            raise UserError(f"{path}: outside the adapter directories this app serves ({served})")
        if not is_finished(path):
            raise UserError(f"{path}: not a finished run (no {COMPLETION_MARKER})")
        for run in self.runs.values():
            if run.path == path:
                return run
        return self.add(read_run(path, adapter_name(path, list(self.runs))))

    @property
    def columns(self) -> list[str]:
        return [BASE, *self.runs]

    def label(self, column: str) -> str:
        return f"base · {self.base.path.name}" if column == BASE else self.runs[column].label

    def check_columns(self, columns: Sequence[str]) -> None:
        unknown = [c for c in columns if c not in self.columns]
        if unknown:
            raise UserError(f"unknown column {unknown[0]!r}; the columns are {', '.join(self.columns)}")

    @contextmanager
    def weights(self, column: str) -> Iterator[None]:
        """The model as `column` computes: its adapter active, or every adapter off for the base."""
        self.check_columns([column])
        with self._lock:
            if not isinstance(self.model, PeftModel):
                yield
            elif column == BASE:
                with self.model.disable_adapter():
                    yield
            else:
                self.model.set_adapter(column, inference_mode=True)
                yield

    # -- prompts --

    def prompt_ids(self, text: str, format_column: str = BASE) -> list[int]:
        """Token ids of `text` as `format_column`'s task rendered prompts in training; every column gets them."""
        if not text.strip():
            raise UserError("the prompt is empty")
        if len(text) > self.limits.max_prompt_chars:
            raise UserError(f"the prompt has {len(text):,} characters; the limit is {self.limits.max_prompt_chars:,}")
        task = self.runs[format_column].task if format_column in self.runs else None
        ids = render_prompt(task_prompt(task, text), self.tokenizers.get(format_column, self.base.tokenizer))
        if len(ids) > self.limits.max_prompt_tokens:
            raise UserError(f"the prompt has {len(ids):,} tokens; the limit is {self.limits.max_prompt_tokens:,}")
        return ids

    def examples(self, format_column: str) -> list[str]:
        return example_prompts(self.runs[format_column].task) if format_column in self.runs else []

    # -- generation --

    def check(self, settings: GenerationSettings) -> None:
        cap = self.limits.max_new_tokens
        if not 1 <= settings.max_new_tokens <= cap:
            raise UserError(f"max new tokens must be between 1 and {cap}, got {settings.max_new_tokens}")
        if not settings.greedy and not (settings.temperature > 0 and 0 < settings.top_p <= 1):
            raise UserError(f"sampling needs temperature > 0 and top-p in (0, 1], got {settings}")

    def stream(self, column: str, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[Partial]:
        """Generate one column, yielding its text as it grows. Generation runs in a thread (`generate` blocks);
        leaving the loop early stops it."""
        self.check(settings)
        tokenizer = self.tokenizers.get(column, self.base.tokenizer)
        sink, stop, errors = _TokenSink(), threading.Event(), []
        worker = threading.Thread(
            target=self._generate, args=(column, prompt_ids, settings, sink, stop, errors), daemon=True
        )
        worker.start()
        ids, first, elapsed = [], None, 0.0
        try:
            while (item := sink.queue.get()) is not None:
                new, at = item
                ids += new
                elapsed = at - sink.started
                first = elapsed if first is None else first
                yield Partial(tokenizer.decode(ids, skip_special_tokens=True), len(ids), first, elapsed)
        finally:
            stop.set()
            worker.join()
        if errors:
            raise errors[0]
        if not ids:  # nothing streamed (EOS first): still report the column
            yield Partial("", 0, None, time.perf_counter() - sink.started)

    def _generate(self, column, prompt_ids, settings, sink: _TokenSink, stop: threading.Event, errors: list) -> None:
        try:
            with self.weights(column), torch.no_grad():
                tokenizer = self.tokenizers.get(column, self.base.tokenizer)
                input_ids = torch.tensor([prompt_ids], device=self.model.device)
                torch.manual_seed(settings.seed)
                sink.started = time.perf_counter()
                sample = not settings.greedy
                self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    **generation_settings(
                        tokenizer, settings.max_new_tokens, sample, settings.temperature, settings.top_p
                    ),
                    streamer=sink,
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                )
        except Exception as exc:  # re-raised in the reader's thread
            errors.append(exc)
            sink.end()

    def complete(self, column: str, prompt_ids: list[int], settings: GenerationSettings) -> Partial:
        """A column's whole answer."""
        *_, last = self.stream(column, prompt_ids, settings)
        return last

    # -- inspection --

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.base.model.model.layers  # PEFT wraps modules in place: these are the live ones

    def lambdas(self, column: str) -> list[float]:
        """λ of every layer as `column` computes it (PEFT keeps one trained copy of `diff_lambda` per adapter)."""
        with self.weights(column), torch.no_grad():
            return [float(layer.self_attn.diff_lambda()) for layer in self.layers]

    def inspect(self, column: str, prompt_ids: list[int], layer: int, head: int) -> Inspection:
        """One forward pass of `column` on the prompt with its attention maps, and hooks that read the SE gates."""
        config = self.base.model.config
        if not config.use_diff_attn:
            raise UserError("this base has no differential attention (use_diff_attn is off): nothing to show")
        if not (0 <= layer < config.num_hidden_layers and 0 <= head < config.num_attention_heads):
            raise UserError(
                f"layer {layer}, head {head}: this base has layers 0-{config.num_hidden_layers - 1} "
                f"and heads 0-{config.num_attention_heads - 1}"
            )
        gates: dict[int, float] = {}

        def gate_hook(index: int):
            return lambda module, args, output: gates.__setitem__(index, (2 * torch.sigmoid(output)).mean().item())

        with ExitStack() as hooks, self.weights(column), eager_attention(self.base.model), torch.no_grad():
            for index, block in enumerate(self.layers):
                if block.se_gate is not None:
                    hooks.callback(block.se_gate.fc2.register_forward_hook(gate_hook(index)).remove)
            ids = torch.tensor([prompt_ids], device=self.model.device)
            maps = self.model(input_ids=ids, output_attentions=True).attentions[layer][0, head]
            lambdas = [float(block.self_attn.diff_lambda()) for block in self.layers]
        tokenizer = self.tokenizers.get(column, self.base.tokenizer)
        return Inspection(
            tokens=[tokenizer.decode([i]) for i in prompt_ids],
            lambdas=lambdas,
            se_gate=[gates.get(i, float("nan")) for i in range(len(self.layers))],
            layer=layer,
            head=head,
            diff_map=maps.float().cpu(),
        )
