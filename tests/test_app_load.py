"""The app under several users at once, as the command line starts it (its own process, on loopback): every request
answered or refused with the queue-full message, none failing; a client that disconnects stops its generation; the
app listens where --host says (127.0.0.1 by default), shares nothing unless asked and makes no analytics calls."""

import os
import sys
from pathlib import Path

import gradio as gr
import pytest
from gradio import analytics
from test_compare import QUESTIONS, trained_runs  # noqa: F401  (a shared session fixture)

from lmdiff_ft.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repository root
from bench import app_load  # noqa: E402


@pytest.mark.slow
def test_eight_clients_asking_for_base_and_two_adapters_are_all_answered(trained_runs):  # noqa: F811
    result = app_load.run(
        trained_runs, clients=8, requests=1, max_queue=16, max_new_tokens=16, prompt=QUESTIONS[0], long=256
    )
    assert (result["requests"], result["answered"], result["errors"]) == (8, 8, 0), result["messages"]
    assert result["latency_p95_s"] >= result["latency_p50_s"] > 0 and result["peak_rss_mib"] > 0
    # the default host, and nothing reached off this machine (no share tunnel, no analytics)
    assert [address.split(":")[0] for address in result["listening"]] == ["127.0.0.1"]
    assert result["connections_off_this_machine"] == []
    disconnect = result["disconnect"]
    assert disconnect["streamed_updates_before_disconnect"] == 2
    assert disconnect["busy_after_s"] is not None and disconnect["busy_after_s"] < disconnect["whole_request_s"] / 2


@pytest.mark.slow
def test_a_burst_beyond_the_queue_is_refused_with_the_queue_full_message(trained_runs):  # noqa: F811
    result = app_load.run(
        trained_runs, clients=8, requests=1, max_queue=2, max_new_tokens=16, prompt=QUESTIONS[0], long=0
    )
    assert result["answered"] + result["refused"] == result["requests"] == 8 and result["errors"] == 0
    assert result["refused"] >= 1 and result["messages"] == ["QueueError: Queue is full! Please try again."]


@pytest.mark.parametrize(
    "flags, host, share", [([], "127.0.0.1", False), (["--host", "0.0.0.0", "--share"], "0.0.0.0", True)]
)
def test_the_app_binds_where_host_says_shares_only_when_asked_and_keeps_analytics_off(
    trained_runs,  # noqa: F811
    monkeypatch,
    flags,
    host,
    share,
):
    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.append((self, kwargs)))
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    assert main(["app", str(trained_runs), "--data-dir", str(trained_runs.parent / "app-data"), *flags]) == 0
    [(demo, kwargs)] = launched
    assert (kwargs["server_name"], kwargs["share"]) == (host, share)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and not analytics.analytics_enabled()
    assert demo.analytics_enabled is False
    assert demo._queue.max_size == 16
