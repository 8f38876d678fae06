"""Limits not covered by tests/server/test_errors.py: the per-request timeout (non-streaming,
streaming and queued requests), absurd sizes answered at once with a 400 (never processed for
minutes), and non-standard JSON numbers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from reliability.support import BASE, OpenStream, slow_engine, wait_for

from mara_serve.server.settings import Settings

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
LONG = {"model": BASE, "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True}
TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def timeout_server(serve: Any) -> Any:
    return serve(request_timeout_s=TIMEOUT_S, max_concurrent=1, max_waiting=4)


@pytest.fixture()
def slow_steps(timeout_server: Any) -> Iterator[threading.Event]:
    """A 400-token request outlasts the timeout whatever the machine's speed."""
    with slow_engine(timeout_server) as gate:
        yield gate


def test_a_request_under_the_timeout_succeeds(timeout_server: Any) -> None:
    r = timeout_server.post("/v1/chat/completions", {**LONG, "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_a_non_stream_request_past_the_timeout_is_408_and_frees_its_slot(
    timeout_server: Any, slow_steps: None
) -> None:
    aborted = timeout_server.metric("mara_requests_total", {"status": "aborted"})
    errors = timeout_server.metric("mara_requests_total", {"status": "error"})
    t0 = time.monotonic()
    r = timeout_server.post("/v1/chat/completions", LONG)
    took = time.monotonic() - t0
    assert r.status_code == 408, r.text
    error = r.json()["error"]
    assert error["code"] == "request_timeout" and error["type"] == "timeout_error"
    assert TIMEOUT_S <= took < TIMEOUT_S + 1.5
    wait_for(lambda: timeout_server.metric("mara_num_requests_running") == 0, 1.0)
    assert timeout_server.metric("mara_requests_total", {"status": "aborted"}) == aborted + 1
    assert timeout_server.metric("mara_requests_total", {"status": "error"}) == errors


def test_a_stream_past_the_timeout_ends_with_an_in_band_408(
    timeout_server: Any, slow_steps: None
) -> None:
    events = timeout_server.sse("/v1/chat/completions", {**LONG, "stream": True})
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "request_timeout"
    assert any(e["choices"][0]["delta"].get("content") for e in events[1:-2])  # it had begun
    wait_for(lambda: timeout_server.metric("mara_num_requests_running") == 0, 1.0)


def test_the_timeout_counts_time_in_the_queue_and_a_stalled_engine(
    timeout_server: Any, slow_steps: threading.Event
) -> None:
    """With the engine stalled mid-request, the running request and one queued behind it (one
    slot) still get their 408 on time, and once the engine moves both leave it."""
    first = OpenStream(timeout_server, LONG)
    assert first.started.wait(5)
    slow_steps.clear()  # the engine stalls before its next step
    t0 = time.monotonic()
    r = timeout_server.post("/v1/chat/completions", {**LONG, "max_tokens": 2})
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - t0 < TIMEOUT_S + 1.0
    first.join(5)
    assert first.errors()[0]["code"] == "request_timeout"
    engine = timeout_server.state.engine.engine
    assert engine.num_waiting == 1 and engine.num_running == 1  # nothing stepped meanwhile
    slow_steps.set()
    wait_for(lambda: engine.num_waiting == 0 and engine.num_running == 0, 1.0)


def test_request_timeout_setting_is_optional_and_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().request_timeout_s is None
    monkeypatch.setenv("MARA_REQUEST_TIMEOUT_S", "")
    assert Settings().request_timeout_s is None
    monkeypatch.setenv("MARA_REQUEST_TIMEOUT_S", "2.5")
    assert Settings().request_timeout_s == 2.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("MARA_REQUEST_TIMEOUT_S", bad)
        with pytest.raises(ValueError):
            Settings()


# ---- absurd sizes: a fast 400, before anything is queued ----------------------------------

ABSURD = [
    ("/v1/chat/completions", {"max_tokens": 10**9}, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {"max_completion_tokens": 10**9}, "max_completion_tokens", None),
    ("/v1/chat/completions", {"max_tokens": 10**9, "stream": True}, "max_tokens", None),
    ("/v1/completions", {"max_tokens": 10**9}, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {"n": 10**9}, "n", None),
    ("/v1/chat/completions", {"top_k": 10**9, "model": "half"}, "top_k", None),
    ("/v1/chat/completions", {"logit_bias": {str(i): 1.0 for i in range(3000)}}, "logit_bias",
     None),  # more than 300 entries
    ("/v1/chat/completions", {"stop": ["x"] * 1000}, "stop", None),
    ("/v1/chat/completions", {"stop_token_ids": list(range(1000))}, "stop_token_ids", None),
]  # fmt: skip


@pytest.mark.parametrize(("path", "fields", "param", "code"), ABSURD)
def test_absurd_sizes_are_refused_at_once(
    module_server: Any, path: str, fields: dict, param: str, code: str | None
) -> None:
    base = {"model": BASE, "max_tokens": 4}
    base.update({"messages": MESSAGES} if "chat" in path else {"prompt": "hi"})
    t0 = time.monotonic()
    r = module_server.post(path, {**base, **fields})
    assert time.monotonic() - t0 < 1.0
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if code is not None:
        assert r.json()["error"]["code"] == code


def test_max_tokens_1e9_as_a_json_float_is_400(module_server: Any) -> None:
    body = b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], '
    r = httpx.post(
        module_server.base_url + "/v1/chat/completions",
        content=body + b'"max_tokens": 1e9}',
        headers={**module_server.auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_a_logit_bias_past_the_body_limit_is_413(module_server: Any) -> None:
    huge = {str(i): 1.0 for i in range(20000)}  # ~270 KB, the limit is 64 KiB
    r = module_server.post("/v1/chat/completions", {"model": BASE, "messages": MESSAGES,
                                                    "logit_bias": huge})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty"])
def test_non_finite_numbers_are_400(module_server: Any, field: str, value: str) -> None:
    """Python's JSON parser accepts NaN and Infinity; the bounds must still refuse them."""
    body = (
        '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], '
        f'"max_tokens": 2, "{field}": {value}}}'
    )
    r = httpx.post(
        module_server.base_url + "/v1/chat/completions",
        content=body,
        headers={**module_server.auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_deeply_nested_json_is_400(module_server: Any) -> None:
    body = '{"model": "tiny-llama", "messages": ' + "[" * 20000 + "]" * 20000 + "}"
    r = httpx.post(
        module_server.base_url + "/v1/chat/completions",
        content=body,
        headers={**module_server.auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
