"""Bad input gets the documented 4xx in OpenAI's error shape — never a 500 — and the server
keeps serving afterwards."""

from __future__ import annotations

import httpx
import pytest

BASE = "tiny-llama"
MSG = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return ("/v1/chat/completions", {"model": BASE, "messages": MSG, "max_tokens": 2, **fields})


def without(key: str):
    path, body = chat()
    del body[key]
    return path, body


def completion(**fields):
    return ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 2, **fields})


# (id, (path, JSON body), status, param, code); param/code None = not checked
CASES = [
    ("missing-messages", without("messages"), 400, "messages", "missing"),
    ("empty-messages", chat(messages=[]), 400, "messages", None),
    ("messages-not-a-list", chat(messages="hi"), 400, "messages", None),
    ("message-without-role", chat(messages=[{"content": "x"}]), 400, "messages[0].role", None),
    (
        "unknown-role",
        chat(messages=[{"role": "wizard", "content": "x"}]),
        400,
        "messages[0].role",
        None,
    ),
    (
        "unknown-role",
        chat(messages=[{"role": "robot", "content": "x"}]),
        400,
        "messages[0].role",
        None,
    ),
    (
        "content-wrong-type",
        chat(messages=[{"role": "user", "content": 12}]),
        400,
        "messages[0].content",
        None,
    ),
    (
        "image-content-part",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ]
        ),
        400,
        "messages[0].content",
        None,
    ),
    (
        "user-content-null",
        chat(messages=[{"role": "user", "content": None}]),
        400,
        "messages[0].content",
        None,
    ),
    ("user-content-missing", chat(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    ("too-many-messages", chat(messages=MSG * 65), 400, "messages", None),
    ("missing-model", without("model"), 400, "model", "missing"),
    ("unknown-model", chat(model="gpt-7"), 404, "model", "model_not_found"),
    ("model-wrong-type", chat(model=3), 400, "model", None),
    ("temperature-too-high", chat(temperature=3), 400, "temperature", None),
    ("temperature-a-string", chat(temperature="hot"), 400, "temperature", None),
    ("top-p-zero", chat(top_p=0), 400, "top_p", None),
    ("top-p-above-one", chat(top_p=1.5), 400, "top_p", None),
    ("top-k-zero", chat(top_k=0), 400, "top_k", None),
    ("n-zero", chat(n=0), 400, "n", None),
    ("n-over-the-cap", chat(n=5), 400, "n", None),
    ("n-a-string", chat(n="2"), 400, "n", None),
    ("max-tokens-zero", chat(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-negative", chat(max_completion_tokens=-5), 400, "max_completion_tokens", None),
    ("max-tokens-a-float", chat(max_tokens=2.5), 400, "max_tokens", None),
    (
        "max-tokens-beyond-context",
        chat(max_tokens=100_000),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "prompt-beyond-context",
        chat(messages=[{"role": "user", "content": "hello " * 600}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "completion-prompt-beyond-context",
        completion(prompt=[5] * 600),
        400,
        "prompt",
        "context_length_exceeded",
    ),
    ("stream-a-string", chat(stream="yes"), 400, "stream", None),
    (
        "stream-options-without-stream",
        chat(stream_options={"include_usage": True}),
        400,
        "stream_options",
        None,
    ),
    ("too-many-stops", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("stop-wrong-type", chat(stop=123), 400, "stop", None),
    ("stop-too-long", chat(stop="x" * 300), 400, "stop", None),
    ("negative-stop-token-id", chat(stop_token_ids=[-1]), 400, "stop_token_ids[0]", None),
    ("seed-out-of-range", chat(seed=2**70), 400, "seed", None),
    ("presence-penalty-out-of-range", chat(presence_penalty=3), 400, "presence_penalty", None),
    ("frequency-penalty-out-of-range", chat(frequency_penalty=-3), 400, "frequency_penalty", None),
    ("logit-bias-not-a-token-id", chat(logit_bias={"hello": 10}), 400, "logit_bias", None),
    ("logit-bias-out-of-vocab", chat(logit_bias={"999999999": 10}), 400, "logit_bias", None),
    ("logit-bias-too-large", chat(logit_bias={"5": 101}), 400, "logit_bias", None),
    ("repetition-penalty-zero", chat(repetition_penalty=0), 400, "repetition_penalty", None),
    ("min-tokens-above-max", chat(min_tokens=9, max_tokens=4), 400, "min_tokens", None),
    ("top-logprobs-without-logprobs", chat(top_logprobs=2), 400, "top_logprobs", None),
    ("top-logprobs-too-many", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    (
        "tool-choice-unknown-function",
        chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        400,
        "tool_choice",
        None,
    ),
    ("tool-choice-without-tools", chat(tool_choice="required"), 400, "tool_choice", None),
    (
        "tool-name-invalid",
        chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
        400,
        "tools[0].function.name",
        None,
    ),
    (
        "json-schema-without-schema",
        chat(response_format={"type": "json_schema"}),
        400,
        "response_format.json_schema",
        None,
    ),
    ("completion-prompt-wrong-type", completion(prompt={"a": 1}), 400, "prompt", None),
    ("completion-prompt-empty-list", completion(prompt=[]), 400, "prompt", None),
    ("completion-token-out-of-vocab", completion(prompt=[10**9]), 400, "prompt", None),
    ("completion-empty-prompt", completion(prompt=""), 400, "prompt", None),
    ("completion-too-many-prompts", completion(prompt=["a"] * 65), 400, "prompt", None),
    ("completion-suffix", completion(suffix="x"), 400, "suffix", "unsupported_parameter"),
    ("completion-logprobs-too-many", completion(logprobs=6), 400, "logprobs", None),
    ("unknown-field", chat(some_future_field=1), 400, "some_future_field", "extra_forbidden"),
    ("completion-best-of", completion(best_of=3), 400, "best_of", "unsupported_parameter"),
    ("completion-echo-a-string", completion(echo="yes"), 400, "echo", None),
    ("completion-max-tokens-0-no-echo", completion(max_tokens=0), 400, "max_tokens", None),
    ("chat-max-tokens-0", chat(max_tokens=0), 400, "max_tokens", None),
]


def check_error(
    r: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
        assert param.split("[")[0].split(".")[0] in err["message"], "the message names the field"
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_documented_error(server, case) -> None:
    _, (path, body), status, param, code = case
    err = check_error(server.post(path, body), status, param, code)
    print(f"{case[0]}: {status} {err}")


def test_malformed_json_is_400(server) -> None:
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=b'{"model": "x",',
        headers={**server.auth, "Content-Type": "application/json"},
    )
    assert check_error(r, 400, code="invalid_json")["message"].startswith("malformed JSON")


@pytest.mark.parametrize("content", [b"[1, 2]", b'"text"', b""], ids=["array", "string", "empty"])
def test_body_that_is_not_an_object_is_400(server, content: bytes) -> None:
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=content,
        headers={**server.auth, "Content-Type": "application/json"},
    )
    check_error(r, 400)


def test_oversized_body_is_413(server) -> None:
    body = {"model": BASE, "messages": [{"role": "user", "content": "x" * 70_000}]}
    check_error(server.post("/v1/chat/completions", body), 413, code="request_too_large")


def test_oversized_chunked_body_is_413(server) -> None:
    def chunks():
        yield b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}]}'

    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=chunks(),
        headers={**server.auth, "Content-Type": "application/json"},
    )
    check_error(r, 413)


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-key", "Basic abc", "Bearer"],
    ids=["missing", "wrong", "not-bearer", "empty"],
)
def test_bad_api_key_is_401(server, header: str | None) -> None:
    path, body = chat()
    headers = {} if header is None else {"Authorization": header}
    err = check_error(server.post(path, body, headers=headers), 401)
    assert err["code"] == "invalid_api_key"
    assert check_error(httpx.get(server.base_url + "/v1/models", headers=headers), 401)


def test_admin_key_is_not_an_api_key(server) -> None:
    path, body = chat()
    check_error(server.post(path, body, headers=server.admin_auth), 401)


def test_unknown_route_and_wrong_method(server) -> None:
    check_error(httpx.get(server.base_url + "/v1/nothing-here", headers=server.auth), 404)
    check_error(httpx.get(server.base_url + "/v1/chat/completions", headers=server.auth), 405)


def test_a_normal_request_succeeds_after_all_the_bad_ones(server) -> None:
    path, body = chat(max_tokens=4)
    r = server.post(path, body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert server.metric("mara_requests_total", {"status": "error"}) == 0
