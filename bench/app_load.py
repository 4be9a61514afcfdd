"""Several people using `lmdiff-ft app` at once: CLIENTS gradio_client sessions send their requests at the same moment,
each asking for the base and two adapters on one prompt, against the app as the command line starts it (its own
process, on 127.0.0.1). Every request must come back answered, or refused with the queue-full message; none may fail.
Then one client disconnects in the middle of a long generation, and the app must stop generating for it.

    python -m bench.app_load                         # 8 clients x 1 request, the default queue (16 waiting)
    python -m bench.app_load --max-queue 2           # a burst larger than the queue: some are refused
    python -m bench.app_load --runs runs --prompt "What is GPM?"   # your own finished runs (two adapters or more)

Without --runs, two adapters are trained for 4 steps each on the tiny base (seconds). Writes
bench/results/app_load.json: clients, requests, answered, refused, errors, latency p50/p95 of the answered ones, the
app's peak RSS (VmHWM), the sockets it listened on and any connection it made off this machine, how long it kept
computing after the disconnect, the machine, versions and the load average during the run.
"""

import argparse
import importlib.metadata
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import torch

from .common import MIB, RESULTS_DIR, load_average, machine_info

QUEUE_FULL = "Queue is full"  # gradio_client's QueueError says "Queue is full! Please try again."
QA = [
    {"question": f"What does mission {i} study?", "answer": f"Mission {i} studies {w}"}
    for i, w in enumerate(["rain", "ice", "dust", "wind", "tides", "soil", "clouds", "fire"] * 2)
]
TASK = """\
name: {name}
base: tiny
quantization: none
output_dir: {out}
adapter: {{r: 8, alpha: 16, dropout: 0.0}}
data: {{train: {data}, eval_fraction: 0.25, fields: {{prompt: question, completion: answer}}}}
train: {{max_steps: 4, batch_size: 4, lr: {lr}, logging_steps: 1, save_steps: 4, max_length: 64, seed: {seed}}}
eval: {{num_samples: 0, train_samples: 0}}
"""


def build_runs(root: Path) -> Path:
    """Two finished runs on the tiny base, as `lmdiff-ft sft` writes them (different seeds and rates)."""
    from lmdiff_ft.recipes.sft import run_sft
    from lmdiff_ft.schema.load import load_task

    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in QA))
    for seed, (name, lr) in enumerate([("alpha", 5e-3), ("beta", 2e-2)]):
        task = root / f"{name}.yaml"
        task.write_text(TASK.format(name=name, out=root / "runs" / name, data=data, lr=lr, seed=seed))
        run_sft(load_task(task))
    return root / "runs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(runs: Path, port: int, max_queue: int, max_new_tokens: int, data_dir: Path) -> subprocess.Popen:
    """`lmdiff-ft app` with its defaults (127.0.0.1, no share link, analytics off) in its own process."""
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}  # the app's own default decides
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "lmdiff_ft", "app", str(runs), "--port", str(port), "--max-queue", str(max_queue)]
    command += ["--max-new-tokens", str(max_new_tokens), "--data-dir", str(data_dir)]
    app = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise RuntimeError(f"the app exited ({app.returncode}):\n{app.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                return app
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    app.kill()
    raise RuntimeError("the app did not answer within 300 s")


def one_client(url: str, adapters: list[str], prompt: str, requests: int, max_new_tokens: int, start) -> list[dict]:
    """One user: a gradio_client session that submits its requests together once every client is ready."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    start.wait()
    outcomes = []
    jobs = [
        (
            time.perf_counter(),
            client.submit(prompt, adapters, adapters[0], max_new_tokens, 0.7, 0.9, seed, True, api_name="/generate"),
        )
        for seed in range(requests)
    ]
    for started, job in jobs:
        try:
            texts = job.result()[:3]  # base, adapter 1, adapter 2
            seconds = time.perf_counter() - started
            if all(isinstance(t, str) for t in texts):
                outcomes.append({"outcome": "answered", "seconds": seconds, "empty_columns": texts.count("")})
            else:
                outcomes.append({"outcome": "error", "message": f"unexpected answer {texts!r}"})
        except Exception as exc:  # what a user would see: the queue-full refusal, or any other failure
            refused = QUEUE_FULL in str(exc)
            outcomes.append({"outcome": "refused" if refused else "error", "message": f"{type(exc).__name__}: {exc}"})
    client.close()
    return outcomes


def generate_fn_index(url: str) -> int:
    config = httpx.get(f"{url}/config", timeout=10).json()
    return next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "generate")


def disconnect_mid_generation(url: str, adapters: list[str], prompt: str, max_new_tokens: int, app_pid: int) -> dict:
    """Time one whole long request (sampled, so that it runs to `max_new_tokens` or near), then send it again as the
    browser does, read two streamed updates, drop the connection, and watch the app's CPU time: it should go idle long
    before the request would have finished."""
    from gradio_client import Client

    inputs = [prompt, adapters, adapters[0], max_new_tokens, 1.0, 1.0, 0, False]
    client = Client(url, verbose=False)
    started = time.perf_counter()
    client.predict(*inputs, api_name="/generate")
    whole = time.perf_counter() - started
    client.close()
    session = uuid.uuid4().hex
    body = {
        "data": inputs,
        "fn_index": generate_fn_index(url),
        "session_hash": session,
        "trigger_id": None,
        "event_data": None,
    }
    httpx.post(f"{url}/gradio_api/queue/join", json=body, timeout=10).raise_for_status()
    updates = 0
    with httpx.Client(timeout=None) as client:
        with client.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if '"process_generating"' in line:
                    updates += 1
                    if updates == 2:
                        break
    disconnected = time.monotonic()
    app = psutil.Process(app_pid)
    last, idle_since = sum(app.cpu_times()[:2]), None
    while time.monotonic() - disconnected < 60:
        time.sleep(0.25)
        now = sum(app.cpu_times()[:2])
        busy = now - last > 0.05  # more than a fifth of a core over the last quarter second
        last = now
        if busy:
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= 1.0:
            break
    busy = round(idle_since - disconnected, 2) if idle_since is not None else None
    return {"whole_request_s": round(whole, 2), "streamed_updates_before_disconnect": updates, "busy_after_s": busy}


def app_sockets(pid: int) -> tuple[list[str], list[str]]:
    """The addresses the app listens on, and every connection it holds to anything but this machine's loopback."""
    connections = psutil.Process(pid).net_connections(kind="inet")
    listening = sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in connections if c.status == psutil.CONN_LISTEN})
    outside = sorted(
        {
            f"{c.raddr.ip}:{c.raddr.port}"
            for c in connections
            if c.raddr and not c.raddr.ip.startswith(("127.", "::1", "::ffff:127."))
        }
    )
    return listening, outside


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run(runs: Path, clients: int, requests: int, max_queue: int, max_new_tokens: int, prompt: str, long: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        app = start_app(runs, port, max_queue, max(max_new_tokens, long), Path(data_dir))
        try:
            adapters = [run.name for run in sorted(p.parent for p in runs.glob("*/adapter_config.json"))][:2]
            start, results = threading.Barrier(clients), []
            load_before = load_average()

            def client(i: int) -> None:
                results.extend(one_client(url, adapters, prompt, requests, max_new_tokens, start))

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            began = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - began
            load_after = load_average()
            disconnect = disconnect_mid_generation(url, adapters, prompt, long, app.pid) if long else None
            listening, outside = app_sockets(app.pid)
            rss = peak_rss(app.pid)
        finally:
            app.terminate()
            app.wait(timeout=60)
    answered = [r["seconds"] for r in results if r["outcome"] == "answered"]
    return {
        "clients": clients,
        "requests": len(results),
        "columns_per_request": 3,
        "max_new_tokens": max_new_tokens,
        "max_queue": max_queue,
        "answered": len(answered),
        "refused": sum(r["outcome"] == "refused" for r in results),
        "errors": sum(r["outcome"] == "error" for r in results),
        "messages": sorted({r["message"] for r in results if "message" in r}),
        "latency_p50_s": percentile(answered, 50),
        "latency_p95_s": percentile(answered, 95),
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(rss / MIB, 1),
        "listening": listening,
        "connections_off_this_machine": outside,
        "disconnect": disconnect,
        "load_average": {"before": load_before, "after": load_after},
    }


def versions() -> dict:
    return {
        name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft", "gradio", "gradio_client")
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, help="finished runs to serve (default: two tiny ones, built here)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1, help="requests per client, submitted together")
    parser.add_argument("--max-queue", type=int, default=16, help="the app's --max-queue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt", default=QA[0]["question"])
    parser.add_argument(
        "--disconnect-tokens", type=int, default=256, help="new tokens of the request cut short (0: none)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "app_load.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        runs = args.runs or build_runs(Path(scratch))
        result = run(
            runs, args.clients, args.requests, args.max_queue, args.max_new_tokens, args.prompt, args.disconnect_tokens
        )
    document = {
        "machine": {**machine_info(torch.device("cpu")), "versions": versions()},
        "flags": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: document[k]
                for k in (
                    "clients",
                    "requests",
                    "answered",
                    "refused",
                    "errors",
                    "latency_p50_s",
                    "latency_p95_s",
                    "peak_rss_mib",
                    "disconnect",
                )
            }
        )
    )
    return document


if __name__ == "__main__":
    main()
