"""POST /tokenize and /detokenize in vLLM's shapes: the same ids the completions see."""

from __future__ import annotations

import httpx

BASE = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=server.auth, timeout=30)


def test_tokenize_matches_what_the_completions_count(server) -> None:
    r = post(server, "/tokenize", {"model": BASE, "messages": MESSAGES})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
    chat = server.post("/v1/chat/completions", {"model": BASE, "messages": MESSAGES,
                                                "max_tokens": 1}).json()  # fmt: skip
    assert chat["usage"]["prompt_tokens"] == body["count"]
    r = post(server, "/tokenize", {"prompt": "Hello world", "return_token_strs": True})
    ids = r.json()["tokens"]
    assert r.json()["token_strs"] and len(r.json()["token_strs"]) == len(ids)
    back = post(server, "/detokenize", {"model": BASE, "tokens": ids}).json()["prompt"]
    assert back.endswith("Hello world")
    done = server.post("/v1/completions", {"model": BASE, "prompt": "Hello world",
                                           "max_tokens": 1}).json()  # fmt: skip
    assert done["usage"]["prompt_tokens"] == len(ids)


def test_tokenize_errors_name_the_field(server) -> None:
    r = post(server, "/tokenize", {"prompt": "a", "messages": MESSAGES})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(server, "/detokenize", {"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = post(server, "/tokenize", {"model": "nope", "prompt": "a"})
    assert r.status_code == 404
    r = httpx.post(server.base_url + "/tokenize", json={"prompt": "a"}, timeout=30)
    assert r.status_code == 401
