"""Readiness, admission and the request lifecycle: /health vs /ready while loading and after a
failure, 429 when the queue is full, disconnects that free the slot, and graceful draining on
SIGTERM through the real `mara serve` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import metric_value

from mara_serve.engine.errors import ModelLoadError
from mara_serve.server import lifecycle
from mara_serve.server.app import create_app
from mara_serve.server.serving.transport import SSEResponse
from mara_serve.server.settings import Settings

BASE = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float, interval: float = 0.02) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(interval)
    return time.monotonic() - start


def long_stream(live, max_tokens: int = 400) -> tuple[httpx.Client, httpx.Response, Iterator]:
    """Open a streaming request and read until its first token; the caller closes it (and
    keeps the line iterator: dropping it mid-stream closes the connection)."""
    client = httpx.Client(timeout=60)
    req = client.build_request(
        "POST",
        live.base_url + "/v1/chat/completions",
        headers=live.auth,
        json={
            "model": BASE,
            "messages": MESSAGES,
            "stream": True,
            "max_tokens": max_tokens,
            "ignore_eos": True,
        },
    )
    r = client.send(req, stream=True)
    assert r.status_code == 200
    lines = r.iter_lines()
    for line in lines:
        if '"content":"' in line and '"content":""' not in line:
            break  # the first token arrived: the request is running
    return client, r, lines


def test_health_is_up_while_the_model_loads_and_ready_only_after(
    monkeypatch: pytest.MonkeyPatch, start_server, tiny_model_dir: Path
) -> None:
    release = threading.Event()
    real_build = lifecycle.build_engine

    def slow_build(settings: Settings):
        assert release.wait(30)
        return real_build(settings)

    monkeypatch.setattr(lifecycle, "build_engine", slow_build)
    live = start_server(
        app=create_app(Settings(model=str(tiny_model_dir), device="cpu")), wait_ready=False
    )
    assert httpx.get(live.base_url + "/health").status_code == 200
    r = httpx.get(live.base_url + "/ready")
    assert r.status_code == 503 and r.json()["phase"] == "loading" and r.headers["retry-after"]
    r = live.post("/v1/chat/completions", {"model": BASE, "messages": MESSAGES})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_loading"
    assert r.headers["retry-after"]
    assert httpx.get(live.base_url + "/metrics").status_code == 200
    release.set()
    live.wait_ready(30)
    r = live.post("/v1/chat/completions", {"model": BASE, "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200


def test_a_model_that_fails_to_load_fails_health(
    monkeypatch: pytest.MonkeyPatch, start_server
) -> None:
    def broken(settings: Settings):
        raise ModelLoadError("no such model: nowhere")

    monkeypatch.setattr(lifecycle, "build_engine", broken)
    fatal = threading.Event()
    app = create_app(Settings(model="nowhere"))
    app.state.mara.on_fatal = fatal.set
    live = start_server(app=app, wait_ready=False)
    assert fatal.wait(10), "the CLI's hook is told to stop the server"
    r = httpx.get(live.base_url + "/health")
    assert r.status_code == 503 and "nowhere" in r.json()["error"]
    assert httpx.get(live.base_url + "/ready").status_code == 503
    r = live.post("/v1/chat/completions", {"model": BASE, "messages": MESSAGES})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_failed"


def test_a_startup_agent_that_does_not_fit_fails_startup(start_server, agent_dir: Path) -> None:
    live = start_server(agents={"w": agent_dir / "wrong-size"}, wait_ready=False)
    wait_for(lambda: httpx.get(live.base_url + "/health").status_code == 503, 10)
    assert "hidden size" in httpx.get(live.base_url + "/health").json()["error"]


def test_stream_disconnect_frees_the_slot_within_a_second(server) -> None:
    aborted = server.metric("mara_requests_total", {"status": "aborted"})
    client, r, _lines = long_stream(server)
    assert server.metric("mara_num_requests_running") == 1
    r.close()
    client.close()
    took = wait_for(lambda: server.metric("mara_num_requests_running") == 0, 1.0)
    assert took < 1.0
    wait_for(lambda: server.metric("mara_requests_total", {"status": "aborted"}) == aborted + 1, 1)


def test_non_stream_disconnect_frees_the_slot(server) -> None:
    body = {"model": "half", "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.base_url + "/v1/chat/completions", json=body, headers=server.auth, timeout=0.5
        )
    wait_for(lambda: server.metric("mara_num_requests_running") == 0, 1.0)


def test_full_queue_is_429_with_retry_after(start_server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(SSEResponse, "heartbeat_s", 0.05)
    live = start_server(max_concurrent=1, max_waiting=1)
    rejected = live.metric("mara_requests_total", {"status": "rejected"})
    client1, resp1, _lines = long_stream(live)
    second_client = httpx.Client(timeout=60)
    second = second_client.send(
        second_client.build_request(
            "POST",
            live.base_url + "/v1/chat/completions",
            json={"model": BASE, "messages": MESSAGES, "stream": True, "max_tokens": 400},
        ),
        stream=True,
    )
    assert second.status_code == 200  # admitted: it waits in the queue
    wait_for(lambda: live.metric("mara_num_requests_waiting") == 1, 5)
    r = live.post("/v1/chat/completions", {"model": BASE, "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert r.headers["retry-after"] == "1"
    assert live.metric("mara_requests_total", {"status": "rejected"}) == rejected + 1
    queued_lines = second.iter_lines()
    assert next(queued_lines).startswith("data: ")  # the role chunk goes out at once
    assert next(line for line in queued_lines if line) == ": keep-alive"  # then keep-alives
    for client, resp in ((client1, resp1), (second_client, second)):
        resp.close()
        client.close()
    wait_for(lambda: live.metric("mara_num_requests_waiting") == 0, 2)
    wait_for(lambda: live.metric("mara_num_requests_running") == 0, 2)
    r = live.post("/v1/chat/completions", {"model": BASE, "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200


def test_engine_failure_is_reported_in_band_or_as_500(start_server) -> None:
    live = start_server()
    engine = live.state.engine.engine
    real_step = engine.step

    def fail_once():  # the first step with a running request fails; the next ones work
        if not engine.running:
            return real_step()
        engine.step = real_step
        raise RuntimeError("simulated device failure")

    client, r, lines = long_stream(live)
    engine.step = fail_once
    rest = [line for line in lines if line]
    r.close()
    client.close()
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: ") :])["error"]
    assert error["code"] == "generation_failed"
    # The client gets the request id to quote, never the exception's text (it goes to the log).
    assert "simulated" not in error["message"] and "RuntimeError" not in error["message"]
    assert r.headers["x-request-id"] in error["message"]
    engine.step = fail_once
    r = live.post("/v1/chat/completions", {"model": BASE, "messages": MESSAGES, "max_tokens": 5})
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
    assert "simulated" not in r.text and r.headers["x-request-id"] in r.json()["error"]["message"]
    assert live.metric("mara_requests_total", {"status": "error"}) == 2
    r = live.post("/v1/chat/completions", {"model": BASE, "messages": MESSAGES, "max_tokens": 5})
    assert r.status_code == 200


# ---- the real process: `mara serve` and SIGTERM ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(model_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`mara serve` on `model_dir` (CPU) as a real process, waited for until ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARA_")}
    cmd = [sys.executable, "-m", "mara_serve", "serve", "--model", str(model_dir),
           "--port", str(port), "--device", "cpu", "--log-level", "warning", *flags]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def ready() -> bool:
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(url + "/ready").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 90, 0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def read_stream(url: str, max_tokens: int, out: dict, started: threading.Event) -> None:
    body = {
        "model": BASE,
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    lines = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if line:
                lines.append(line)
                started.set()
    out["lines"] = lines


def test_sigterm_drains_running_streams_then_exits(long_context_model_dir: Path) -> None:
    proc, url = serve_process(long_context_model_dir, "--graceful-shutdown-s", "3")
    try:
        short, long_, threads = {}, {}, []
        # 5-40 ms a token on 2 CPU cores: the short one ends within the grace period, the
        # long one cannot (>= 20 s)
        for out, n in ((short, 16), (long_, 4000)):
            started = threading.Event()
            t = threading.Thread(target=read_stream, args=(url, n, out, started))
            t.start()
            assert started.wait(10)
            threads.append(t)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(url + "/ready").status_code == 503, 2)
        r = httpx.post(url + "/v1/chat/completions", json={"model": BASE, "messages": MESSAGES})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_draining"
        for t in threads:
            t.join(20)
        assert short["status"] == long_["status"] == 200
        # the short stream finished normally within the grace period ...
        assert short["lines"][-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in short["lines"][-2]
        # ... the long one was cut at the end of it, with an in-band error, then [DONE]
        assert long_["lines"][-1] == "data: [DONE]"
        assert '"error"' in long_["lines"][-2] and "shutting down" in long_["lines"][-2]
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_torch_threads_apply_to_the_engine_thread(tiny_model_dir: Path) -> None:
    """`mara serve --torch-threads N` (a container should match its CPU share): the engine
    thread that loads and steps the model runs torch with N threads, reported in /metrics.
    N is more than the machine's cores, so torch's own default can never equal it."""
    threads = (os.cpu_count() or 1) + 1
    proc, url = serve_process(tiny_model_dir, "--torch-threads", str(threads))
    try:
        r = httpx.post(url + "/v1/chat/completions",
                       json={"model": BASE, "messages": MESSAGES, "max_tokens": 4})  # fmt: skip
        assert r.status_code == 200
        assert metric_value(httpx.get(url + "/metrics").text, "mara_torch_threads") == threads
    finally:
        proc.terminate()
        proc.wait(30)


def test_int8_quantization_serves_the_quantized_model(tiny_model_dir: Path) -> None:
    """`mara serve --dtype bfloat16 --quantization int8`: the process loads int8 weights
    (/metrics' mara_model_weight_bytes is the int8 model's, not the bf16 one's) and answers
    with the greedy tokens of that quantized model."""
    from mara_serve.engine.loading import ModelConfig, load_model, render_chat
    from mara_serve.engine.reference import reference_generate
    from mara_serve.engine.sampling import SamplingParams

    config = ModelConfig(model=str(tiny_model_dir), device="cpu", dtype="bfloat16")
    bf16 = load_model(config)
    int8 = load_model(ModelConfig(**{**config.__dict__, "quantization": "int8"}))
    # (this tiny model's tied 49k-row head gets an int8 copy: more bytes, not fewer)
    assert int8.weight_bytes != bf16.weight_bytes
    ids = render_chat(int8.tokenizer, MESSAGES)
    want, _ = reference_generate(int8.model, ids, None,
                                 SamplingParams(max_new_tokens=8, temperature=0.0),
                                 int8.eos_token_ids)  # fmt: skip
    proc, url = serve_process(tiny_model_dir, "--dtype", "bfloat16", "--quantization", "int8")
    try:
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": BASE, "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
        })  # fmt: skip
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert text == int8.tokenizer.decode(want, skip_special_tokens=True)
        weights = metric_value(httpx.get(url + "/metrics").text, "mara_model_weight_bytes")
        assert weights == int8.weight_bytes
    finally:
        proc.terminate()
        proc.wait(30)


def test_native_decode_serves_and_can_be_turned_off(tiny_model_dir: Path) -> None:
    """By default one-token forwards run in the native CPU kernel (/metrics counts them);
    `--no-cpu-native-decode` serves on the eager runner. Same greedy text either way (float32)."""
    texts = []
    for flags, native in (((), 1), (("--no-cpu-native-decode",), 0)):
        proc, url = serve_process(tiny_model_dir, "--dtype", "float32", *flags)
        try:
            r = httpx.post(url + "/v1/chat/completions", json={
                "model": BASE, "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
            })  # fmt: skip
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["message"]["content"])
            metrics = httpx.get(url + "/metrics").text
            assert metric_value(metrics, "mara_native_decode") == native
            forwards = metric_value(metrics, "mara_native_decode_forwards_total")
            assert (forwards >= 7) if native else forwards == 0
        finally:
            proc.terminate()
            proc.wait(30)
    assert texts[0] == texts[1]
