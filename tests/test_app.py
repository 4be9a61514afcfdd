"""The app's event handlers, called as the page calls them (no browser), and its safe defaults."""

import json

import gradio as gr
import pytest
from test_compare import QUESTIONS, one_thread, trained_runs  # noqa: F401  (a shared session fixture)

from lmdiff_ft.cli import build_parser, main
from lmdiff_ft.serve.app import SLOTS, CompareApp
from lmdiff_ft.serve.compare import Comparer
from lmdiff_ft.serve.runs import BASE
from lmdiff_ft.serve.settings import Limits
from lmdiff_ft.serve.votes import VoteLog


@pytest.fixture(scope="module")
def app(trained_runs, tmp_path_factory) -> CompareApp:  # noqa: F811
    comparer, problems = Comparer.from_runs([trained_runs], limits=Limits(max_prompt_chars=200, max_new_tokens=16))
    return CompareApp(comparer, VoteLog(tmp_path_factory.mktemp("app-data")), problems)


@pytest.fixture(autouse=True)
def single_threaded_torch():
    with one_thread():
        yield


def generate(app: CompareApp, text: str, adapters=("alpha", "beta"), max_new_tokens: int = 8) -> list[list]:
    return list(app.generate(text, list(adapters), "alpha", max_new_tokens, 0.7, 0.9, 0, True))


def test_generate_streams_every_column_and_keeps_the_last_generation(app):
    updates = generate(app, QUESTIONS[0])
    texts, stats = updates[-1][:SLOTS], updates[-1][SLOTS : 2 * SLOTS]
    rendered, message, last = updates[-1][2 * SLOTS :]
    assert all(texts[:3]) and texts[3:] == ["", ""]
    assert texts[1] != texts[0] and texts[2] != texts[0]
    assert all("tokens/s" in s for s in stats[:3])
    assert "<|user|>" in rendered and QUESTIONS[0] in rendered
    assert message.startswith("done: 3 columns")
    assert last["outputs"] == {BASE: texts[0], "alpha": texts[1], "beta": texts[2]}
    assert len(updates) > 3  # streamed, not one final update


def test_an_over_long_prompt_is_rejected_with_a_message(app):
    [update] = generate(app, "x" * 201)
    assert update[2 * SLOTS + 1] == "⚠️ the prompt has 201 characters; the limit is 200"
    assert update[: 2 * SLOTS] == [""] * (2 * SLOTS) and update[-1] is None
    [update] = generate(app, QUESTIONS[0], max_new_tokens=17)
    assert "between 1 and 16" in update[2 * SLOTS + 1]


def test_a_path_outside_the_adapter_dirs_is_refused(app, tmp_path):
    message, adapters, *_ = app.add_run(str(tmp_path))
    assert message.startswith("⚠️ ") and "outside the adapter directories" in message
    assert [value for _, value in adapters.choices] == ["alpha", "beta"]


def test_votes_append_a_line_with_prompt_settings_outputs_and_names(app):
    last = generate(app, QUESTIONS[1])[-1][-1]
    message, tally = app.vote("right better", BASE, "alpha", last)
    assert message.startswith("recorded")
    line = json.loads(app.votes.path.read_text().splitlines()[-1])
    assert line["vote"] == "right better" and line["prompt"] == QUESTIONS[1]
    assert line["left"] == {"column": BASE, "label": app.comparer.label(BASE), "output": last["outputs"][BASE]}
    assert line["right"]["column"] == "alpha" and line["right"]["output"] == last["outputs"]["alpha"]
    assert line["settings"]["greedy"] is True and line["prompt_format"] == "alpha"
    assert [BASE, "alpha", 0, 1, 0, 0] in tally
    assert app.vote("tie", "alpha", "alpha", last)[0].startswith("⚠️")
    assert app.vote("tie", BASE, "alpha", None)[0].startswith("⚠️ generate")


def test_inspect_draws_the_plots_and_the_loss_curve(app):
    lambdas, gates, attention, loss, message = app.inspect("alpha", 1, 2, QUESTIONS[2], "alpha")
    assert all(figure.get_axes() for figure in (lambdas, gates, attention))
    assert loss.size[0] > 0 and "prompt tokens, layer 1, head 2" in message
    assert app.inspect("alpha", 0, 0, "", "alpha")[-1] == "⚠️ type a prompt on the Compare tab first"
    assert "heads 0-3" in app.inspect("alpha", 0, 9, QUESTIONS[2], "alpha")[-1]


def test_selecting_more_than_four_adapters_keeps_four(app):
    adapters, *columns = app.show_columns(["alpha", "beta"] * 3)[: 1 + SLOTS]
    assert adapters == ["alpha", "beta"] * 2
    assert all(column.visible for column in columns)
    assert app.show_columns(["beta"])[-1] == ""


def test_the_page_builds(app):
    assert isinstance(app.build(), gr.Blocks)


def test_the_app_listens_locally_and_shares_nothing_by_default():
    args = build_parser().parse_args(["app"])
    assert (args.host, args.share, args.runs) == ("127.0.0.1", False, ["runs"])


def test_no_runs_to_serve_is_a_one_line_error(tmp_path, capsys):
    assert main(["app", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"lmdiff-ft app: error: no finished run under {tmp_path} (train one: lmdiff-ft sft TASK.yaml), and no --base\n"
    )
