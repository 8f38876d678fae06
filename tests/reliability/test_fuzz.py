"""Schema fuzzing: schemathesis generates valid and invalid requests for every public route of
the live server's /openapi.json and checks that none gets a 5xx, that every response (status,
content type, headers, body) is the one the schema documents, and that every error is an
OpenAI error object. Short and deterministic here (derandomized, a few dozen examples per
route); `bench/fuzz.py` runs the long version. Plus regressions for what fuzzing found.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reliability.support import BASE
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Every public route; the admin ones last (fuzzing may unload the agent the others use).
OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/admin/agents"),
    ("PUT", "/admin/agents/{name}"),
    ("DELETE", "/admin/agents/{name}"),
]
MAX_EXAMPLES = 25
MAX_TOKENS = 48
# Valid requests mostly name no model at all (random strings): steer some to real ones so the
# engine, agents and the admin loader are fuzzed too, not only the 404 path.
MODELS = [BASE, "half", None, BASE]
AGENT_PATHS = [None, "half", "reject", "wrong-size", "half/agent.json", "."]


def header(response: Any, name: str) -> str:
    """A response header (schemathesis keeps each as a list of values)."""
    for key, value in response.headers.items():
        if key.lower() == name:
            return value[0] if isinstance(value, list) else value
    return ""


def check_openai_error(response: Any) -> None:
    """A non-2xx answer carries exactly OpenAI's error object (and Retry-After on 429/503)."""
    if response.status_code < 400 or response.request.url.endswith(("/health", "/ready")):
        return
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    if response.status_code in (429, 503):
        assert header(response, "retry-after").isdigit()


def check_stream(response: Any) -> None:
    """An SSE answer: `data:` events (or keep-alive comments) ending in [DONE]; an error sent
    in-band is an OpenAI error object and never the server's fault (only a timeout)."""
    if not header(response, "content-type").startswith("text/event-stream"):
        return
    events = [line for line in response.content.decode().splitlines() if line]
    assert events and events[-1] == "data: [DONE]", events[-3:]
    for line in events[:-1]:
        if line.startswith(":"):
            continue
        payload = json.loads(line.removeprefix("data: "))
        if "error" in payload:
            assert set(payload["error"]) == {"message", "type", "param", "code"}
            assert payload["error"]["code"] == "request_timeout", payload


# Fields the schema allows but the server refuses (400 unsupported_parameter) or that need a
# partner field; a "plausible" case drops them so random sampling settings reach the engine.
REFUSED = (
    "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "suffix", "best_of",
    "frequency_penalty", "presence_penalty", "logit_bias", "stream_options",
)  # fmt: skip


def steer(case: Any, i: int) -> None:
    """Point the i-th valid case at a real model / agent file; 2 in 3 also drop the fields the
    server refuses, so that random sampling settings, stops, n and prompts reach the engine."""
    body = case.body
    if not isinstance(body, dict):
        return
    if "model" in body and MODELS[i % len(MODELS)] is not None:
        body["model"] = MODELS[i % len(MODELS)]
    if "path" in body and AGENT_PATHS[i % len(AGENT_PATHS)] is not None:
        body["path"] = AGENT_PATHS[i % len(AGENT_PATHS)]
    if "model" in body and i % 3 != 2:
        for name in REFUSED:
            body.pop(name, None)
        for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if isinstance(body.get(name), int) and body[name] > MAX_TOKENS:
                body[name] = MAX_TOKENS  # keeps the run short; the bounds are fuzzed otherwise
        for message in body.get("messages") or []:
            if isinstance(message, dict) and message.get("content") is None:
                message["content"] = "hi"


@pytest.fixture(scope="module")
def schema(module_server: Any) -> Any:
    # Read whole streams (schemathesis stops after 20 events by default): [DONE] is checked.
    config = schemathesis.Config.from_dict({"max-stream-events": 100_000})
    return schemathesis.openapi.from_url(module_server.base_url + "/openapi.json", config=config)


def test_the_schema_lists_every_public_route_and_no_422(schema: Any) -> None:
    raw = schema.raw_schema
    listed = {(m.upper(), p) for p, ops in raw["paths"].items() for m in ops}
    assert listed == set(OPERATIONS)
    statuses = {s for ops in raw["paths"].values() for op in ops.values() for s in op["responses"]}
    assert "422" not in statuses  # FastAPI's default; validation errors here are 400


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzzed_requests_get_no_5xx_and_only_documented_openai_errors(
    module_server: Any, schema: Any, method: str, path: str
) -> None:
    op = schema[path][method]
    key = module_server.admin_key if path.startswith("/admin") else module_server.api_key
    headers = {"Authorization": f"Bearer {key}"}
    positive = op.as_strategy(GenerationMode.POSITIVE)
    strategy = positive
    if op.path_parameters or op.body:  # something to make invalid
        strategy = st.one_of(positive, positive, op.as_strategy(GenerationMode.NEGATIVE))
    counter = itertools.count()

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
    )
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        if not case.meta.generation.mode.is_negative:
            steer(case, next(counter))
        response = case.call(headers=headers, timeout=30)
        case.validate_response(response, checks=CHECKS, headers=headers)
        check_openai_error(response)
        check_stream(response)

    fuzz()
    assert httpx.get(module_server.base_url + "/health").status_code == 200


# ---- regressions: what fuzzing found ------------------------------------------------------


def test_an_agent_path_the_os_refuses_is_400_not_500(module_server: Any) -> None:
    for path in ("0" * 300, "half/" + "b" * 256):  # a name past NAME_MAX: ENAMETOOLONG
        r = httpx.put(
            module_server.base_url + "/admin/agents/x",
            json={"path": path},
            headers=module_server.admin_auth,
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_agent_path"


@pytest.mark.parametrize("prompt", [[5, -1], [10**9], [2**70], [[5], [-3]]])
def test_echoing_out_of_vocab_token_ids_is_400_not_500(module_server: Any, prompt: list) -> None:
    body = {"model": BASE, "prompt": prompt, "echo": True, "max_tokens": 2}
    r = module_server.post("/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("temperature", [1e-300, 2e-214, 5e-324, 1e-6])
@pytest.mark.parametrize("stream", [False, True])
def test_a_vanishing_temperature_samples_greedily_not_500(
    module_server: Any, temperature: float, stream: bool
) -> None:
    """logits / 2e-214 overflowed to inf: the softmax was NaN and the request failed."""
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "ignore_eos": True, "stream": stream}  # fmt: skip
    greedy = module_server.post("/v1/chat/completions", {**body, "stream": False, "temperature": 0})
    if stream:
        events = module_server.sse("/v1/chat/completions", {**body, "temperature": temperature})
        assert events[-1] == "[DONE]" and "error" not in events[-2]
    else:
        r = module_server.post("/v1/chat/completions", {**body, "temperature": temperature})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/admin/agents/x", "DELETE, PUT"),  # two routes share the path
        ("GET", "/v1/chat/completions", "POST"),
        ("DELETE", "/health", "GET"),
    ],
)
def test_405_lists_every_method_of_the_path(
    module_server: Any, method: str, path: str, allow: str
) -> None:
    r = httpx.request(method, module_server.base_url + path, headers=module_server.admin_auth)
    assert r.status_code == 405
    assert r.headers["allow"] == allow
    assert r.json()["error"]["code"] == "method_not_allowed"
