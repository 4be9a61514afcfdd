"""`lmdiff-ft app` / `python app.py`: the base and up to four adapters side by side in the browser.

A thin Gradio layer over `compare.Comparer`: one prompt, shared settings, one streaming column per model;
a tab that shows why two columns differ (λ, SE gate, attention maps, loss curve); pairwise votes to a JSONL
file. Safe by default: it listens on 127.0.0.1, makes no share link unless asked, serves only run
directories under the ones it was started with, caps prompt and answer length, runs one model call at a
time through Gradio's queue, and makes no analytics calls. Mistakes show as a one-line message.

`CompareApp`'s methods are the event handlers, plain functions of component values, so tests call them
without a browser.
"""

from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path

import gradio as gr
from PIL import Image

from ..errors import UserError
from .compare import Comparer
from .plots import attention_figure, lambda_figure, se_gate_figure
from .runs import BASE
from .settings import DEFAULT_LIMITS, QUEUE_SIZE, GenerationSettings, Limits
from .votes import VOTES, VoteLog

MAX_ADAPTERS = 4
SLOTS = 1 + MAX_ADAPTERS  # the base column, then the adapters
MODEL = "model"  # every event that runs the model shares this concurrency id: one at a time


def warning(message: str) -> str:
    return f"⚠️ {message}"


class CompareApp:
    """The app's state (the engine and the vote log) and its event handlers."""

    def __init__(self, comparer: Comparer, votes: VoteLog, problems: list[str] = ()):
        self.comparer = comparer
        self.votes = votes
        self.problems = list(problems)

    # -- what the page lists --

    def adapter_choices(self) -> list[tuple[str, str]]:
        return [(self.comparer.label(name), name) for name in self.comparer.runs]

    def format_choices(self) -> list[tuple[str, str]]:
        return [*self.adapter_choices(), ("no task: the base tokenizer's chat template", BASE)]

    def status(self) -> str:
        lines = [f"**{self.comparer.base.describe()}** · {len(self.comparer.runs)} adapter(s) served"]
        lines += [f"- not served: {problem}" for problem in self.problems]
        return "\n".join(lines)

    def default_adapters(self) -> list[str]:
        return list(self.comparer.runs)[:MAX_ADAPTERS]

    # -- compare tab --

    def show_columns(self, adapters: list[str]) -> list:
        """One visible column per selected model; the vote pickers offer the same columns."""
        message = ""
        if len(adapters) > MAX_ADAPTERS:
            adapters, message = adapters[:MAX_ADAPTERS], warning(f"at most {MAX_ADAPTERS} adapters side by side")
        columns = [BASE, *adapters]
        choices = [(self.comparer.label(c), c) for c in columns]
        return [
            adapters,
            *(gr.Column(visible=i < len(columns)) for i in range(SLOTS)),
            *(f"#### {self.comparer.label(columns[i])}" if i < len(columns) else "" for i in range(SLOTS)),
            gr.Dropdown(choices=choices, value=BASE),
            gr.Dropdown(choices=choices, value=columns[1] if len(columns) > 1 else BASE),
            message,
        ]

    def examples(self, prompt_format: str) -> gr.Dropdown:
        return gr.Dropdown(choices=self.comparer.examples(prompt_format), value=None)

    def generate(
        self,
        text: str,
        adapters: list[str],
        prompt_format: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        seed: float,
        greedy: bool,
    ) -> Iterator[list]:
        """Stream every column in turn; yields [*texts, *stats, rendered prompt, message, last generation]."""
        texts, stats = [""] * SLOTS, [""] * SLOTS
        settings = GenerationSettings(int(max_new_tokens), float(temperature), float(top_p), int(seed), bool(greedy))
        columns = [BASE, *adapters[:MAX_ADAPTERS]]
        try:
            self.comparer.check(settings)
            self.comparer.check_columns(columns)
            ids = self.comparer.prompt_ids(text, prompt_format)
        except UserError as exc:
            yield [*texts, *stats, "", warning(str(exc)), None]
            return
        rendered = self.comparer.tokenizers.get(prompt_format, self.comparer.base.tokenizer).decode(ids)
        for i, column in enumerate(columns):
            for partial_answer in self.comparer.stream(column, ids, settings):
                texts[i], stats[i] = partial_answer.text, partial_answer.stats()
                yield [*texts, *stats, rendered, f"generating {self.comparer.label(column)} …", None]
        last = {
            "prompt": text,
            "prompt_format": prompt_format,
            "settings": asdict(settings),
            "outputs": dict(zip(columns, texts, strict=False)),
        }
        yield [*texts, *stats, rendered, f"done: {len(columns)} columns, seed {settings.seed}", last]

    def vote(self, choice: str, left: str, right: str, last: dict | None) -> tuple[str, list[list]]:
        """Append one judgement of the last generation's `left` vs `right` column."""
        outputs = (last or {}).get("outputs", {})
        if left not in outputs or right not in outputs:
            return warning("generate with both columns first, then vote"), self.votes.tally()
        if left == right:
            return warning("pick two different columns to compare"), self.votes.tally()

        def side(column: str) -> dict:
            return {"column": column, "label": self.comparer.label(column), "output": outputs[column]}

        settings = GenerationSettings(**last["settings"])
        self.votes.record(choice, last["prompt"], settings, side(left), side(right), last["prompt_format"])
        return f"recorded “{choice}” ({left} vs {right}) in {self.votes.path}", self.votes.tally()

    def add_run(self, directory: str) -> list:
        """Serve one more run directory (only under the directories the app was started with)."""
        try:
            run = self.comparer.add_run(directory.strip())
            message = f"serving {run.label}"
        except UserError as exc:
            message = warning(str(exc))
        adapters = self.adapter_choices()
        return [
            message,
            gr.CheckboxGroup(choices=adapters),
            gr.Dropdown(choices=self.format_choices()),
            gr.Dropdown(choices=adapters),
            self.status(),
        ]

    # -- why-they-differ tab --

    def inspect(self, adapter: str | None, layer: float, head: float, text: str, prompt_format: str) -> list:
        """[λ figure, SE gate figure, attention figure, loss curve, message] for base vs `adapter`."""
        if not adapter:
            return [None, None, None, None, warning("no adapter to inspect")]
        if not text.strip():
            return [None, None, None, None, warning("type a prompt on the Compare tab first")]
        try:
            ids = self.comparer.prompt_ids(text, prompt_format)
            base = self.comparer.inspect(BASE, ids, int(layer), int(head))
            tuned = self.comparer.inspect(adapter, ids, int(layer), int(head))
        except UserError as exc:
            return [None, None, None, None, warning(str(exc))]
        loss_curve, note = self.loss_curve(adapter)
        return [
            lambda_figure(base, tuned, adapter),
            se_gate_figure(base, tuned, adapter),
            attention_figure(base, tuned, adapter),
            loss_curve,
            note or f"{len(ids)} prompt tokens, layer {int(layer)}, head {int(head)}",
        ]

    def loss_curve(self, adapter: str) -> tuple[Image.Image | None, str]:
        path = self.comparer.runs[adapter].path / "loss_curve.png"
        if not path.is_file():
            return None, warning(f"{path}: missing (the run wrote no loss curve)")
        with Image.open(path) as image:
            return image.copy(), ""

    # -- the page --

    def build(self) -> gr.Blocks:
        config = self.comparer.base.model.config
        limits = self.comparer.limits
        adapters = self.default_adapters()
        formats = self.format_choices()
        first_format = adapters[0] if adapters else BASE
        with gr.Blocks(title="lmdiff-ft: compare adapters", analytics_enabled=False) as demo:
            gr.Markdown("## LM-Diff: base vs adapters, same prompt, same seed")
            status = gr.Markdown(self.status(), elem_id="status")
            with gr.Tab("Compare"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(
                            label="Prompt",
                            lines=4,
                            elem_id="prompt",
                            placeholder=f"your message (at most {limits.max_prompt_chars:,} characters)",
                        )
                        example = gr.Dropdown(
                            label="Example prompts (the task's eval split)",
                            choices=self.comparer.examples(first_format),
                            value=None,
                        )
                        with gr.Row():
                            run = gr.Button("Generate", variant="primary", elem_id="generate")
                            regenerate = gr.Button("Regenerate (next seed)", elem_id="regenerate")
                            clear = gr.Button("Clear", elem_id="clear")
                        message = gr.Markdown(elem_id="message")
                    with gr.Column(scale=2):
                        chosen = gr.CheckboxGroup(
                            self.adapter_choices(), value=adapters, label="Adapters", elem_id="adapters"
                        )
                        prompt_format = gr.Dropdown(
                            formats, value=first_format, label="Prompt format (whose task template)"
                        )
                        cap, default = limits.max_new_tokens, GenerationSettings()
                        max_new = gr.Slider(
                            1, cap, value=min(default.max_new_tokens, cap), step=1, label="Max new tokens"
                        )
                        temperature = gr.Slider(0.05, 2.0, value=default.temperature, step=0.05, label="Temperature")
                        top_p = gr.Slider(0.05, 1.0, value=default.top_p, step=0.05, label="Top-p")
                        seed = gr.Number(default.seed, precision=0, label="Seed")
                        greedy = gr.Checkbox(default.greedy, label="Greedy (ignore temperature and top-p)")
                shown = [BASE, *adapters]
                columns, headers, texts, stats = [], [], [], []
                with gr.Row(equal_height=True):
                    for i in range(SLOTS):
                        with gr.Column(visible=i < len(shown), min_width=200) as column:
                            headers.append(
                                gr.Markdown(f"#### {self.comparer.label(shown[i])}" if i < len(shown) else "")
                            )
                            texts.append(gr.Textbox(label="answer", lines=8, interactive=False, elem_id=f"output-{i}"))
                            stats.append(gr.Markdown(elem_id=f"stats-{i}"))
                        columns.append(column)
                with gr.Accordion("What every column sees (the rendered prompt)", open=False):
                    rendered = gr.Textbox(show_label=False, lines=4, interactive=False, elem_id="rendered")
                with gr.Accordion("Vote", open=True):
                    pair = [(self.comparer.label(c), c) for c in shown]
                    with gr.Row():
                        left = gr.Dropdown(pair, value=BASE, label="Left")
                        right = gr.Dropdown(pair, value=shown[1] if len(shown) > 1 else BASE, label="Right")
                    with gr.Row():
                        buttons = [gr.Button(v.capitalize(), elem_id=f"vote-{v.replace(' ', '-')}") for v in VOTES]
                    tally = gr.Dataframe(
                        self.votes.tally(), headers=["left", "right", *VOTES], interactive=False, label="Tally"
                    )
                with gr.Accordion("Serve another run directory", open=False):
                    with gr.Row():
                        new_run = gr.Textbox(label="Run directory (under the served directories)", elem_id="add-path")
                        add = gr.Button("Add", elem_id="add-run")
                last = gr.State(None)

            with gr.Tab("Why they differ") as why:
                with gr.Row():
                    first_adapter = adapters[0] if adapters else None
                    inspected = gr.Dropdown(self.adapter_choices(), value=first_adapter, label="Adapter (vs the base)")
                    layer = gr.Slider(0, config.num_hidden_layers - 1, value=0, step=1, label="Layer")
                    head = gr.Slider(0, config.num_attention_heads - 1, value=0, step=1, label="Head")
                    show = gr.Button("Show plots", variant="primary", elem_id="inspect")
                why_message = gr.Markdown(elem_id="why-message")
                with gr.Row():
                    lambda_plot = gr.Plot(label="λ per layer", elem_id="lambda-plot")
                    se_plot = gr.Plot(label="SE gate mean activation per layer", elem_id="se-plot")
                attention_plot = gr.Plot(label="Attention maps", elem_id="attention-plot")
                loss = gr.Image(type="pil", label="Training loss (from the run)", interactive=False, elem_id="loss")

            generation_inputs = [prompt, chosen, prompt_format, max_new, temperature, top_p, seed, greedy]
            generation_outputs = [*texts, *stats, rendered, message, last]
            run.click(self.generate, generation_inputs, generation_outputs, concurrency_id=MODEL)
            regenerate.click(lambda s: int(s) + 1, seed, seed).then(
                self.generate, generation_inputs, generation_outputs, concurrency_id=MODEL
            )
            clear.click(lambda: ["", *[""] * (2 * SLOTS), "", "", None], None, [prompt, *generation_outputs])
            chosen.change(self.show_columns, chosen, [chosen, *columns, *headers, left, right, message])
            prompt_format.change(self.examples, prompt_format, example)
            example.input(lambda e: e or "", example, prompt)
            for choice, button in zip(VOTES, buttons, strict=True):
                button.click(partial(self.vote, choice), [left, right, last], [message, tally])
            add.click(self.add_run, new_run, [message, chosen, prompt_format, inspected, status], concurrency_id=MODEL)

            inspect_inputs = [inspected, layer, head, prompt, prompt_format]
            inspect_outputs = [lambda_plot, se_plot, attention_plot, loss, why_message]
            show.click(self.inspect, inspect_inputs, inspect_outputs, concurrency_id=MODEL)
            why.select(self.inspect, inspect_inputs, inspect_outputs, concurrency_id=MODEL)
        return demo


def serve(
    roots: list[str],
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    base: str | None = None,
    quantization: str | None = None,
    data_dir: str = "runs/app",
    limits: Limits | None = None,
    max_queue: int = QUEUE_SIZE,
) -> None:
    """Load the base and adapters once, then serve the page until interrupted."""
    comparer, problems = Comparer.from_runs([Path(r) for r in roots], base, quantization, limits or DEFAULT_LIMITS)
    for problem in problems:
        print(f"not served: {problem}")
    demo = CompareApp(comparer, VoteLog(data_dir), problems).build()
    demo.queue(default_concurrency_limit=1, max_size=max_queue, api_open=False)
    demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, mcp_server=False, show_error=False)
