"""Walks the served OpenAPI schema: every request field of the generation routes is classified
as implemented, refused unless at its "off" value, or accepted with no effect (documented) —
a field added without a decision fails here — and every refused field is refused."""

from __future__ import annotations

import httpx
import pytest

from mara_serve.server.protocol.chat import CHAT_OFF_VALUES
from mara_serve.server.protocol.common import VLLM_OFF_VALUES

IMPLEMENTED = {
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "n", "stop", "seed",
    "stream", "stream_options", "temperature", "top_p", "top_k", "logprobs", "top_logprobs",
    "response_format", "guided_json", "guided_regex", "guided_choice", "structured_outputs",
    "tools", "tool_choice", "presence_penalty", "frequency_penalty", "logit_bias",
    "repetition_penalty", "min_tokens", "include_stop_str_in_output", "add_generation_prompt",
    "continue_final_message", "ignore_eos", "stop_token_ids", "mara_trace",
    "truncate_prompt_tokens", "allowed_token_ids", "return_token_ids", "min_p", "guided_grammar",
    "prompt_logprobs", "echo", "bad_words", "skip_special_tokens", "chat_template",
    "chat_template_kwargs",
}  # fmt: skip
COMPLETIONS_ONLY = {"prompt", "echo", "best_of", "suffix"}  # implemented (suffix/best_of ≠ n: 400)
NO_EFFECT = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
             "modalities", "parallel_tool_calls"}  # fmt: skip
REFUSED = {"/v1/chat/completions": set(VLLM_OFF_VALUES) | set(CHAT_OFF_VALUES),
           "/v1/completions": set(VLLM_OFF_VALUES)}  # fmt: skip
# a value that asks for what the server does not do, per refused field
ASK = {
    "guided_decoding_backend": "xgrammar", "guided_whitespace_pattern": " ",
    "logits_processors": ["p"], "use_beam_search": True,
    "length_penalty": 2.0, "spaces_between_special_tokens": False,
    "documents": [{"text": "d"}],
}  # fmt: skip


def request_fields(server, path: str) -> set[str]:
    spec = httpx.get(server.base_url + "/openapi.json").json()
    ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = ref["$ref"].rsplit("/", 1)[-1]
    return set(spec["components"]["schemas"][name]["properties"])


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_every_request_field_has_a_decision(server, path) -> None:
    fields = request_fields(server, path)
    implemented = IMPLEMENTED | (COMPLETIONS_ONLY if path == "/v1/completions" else set())
    refused = REFUSED[path]
    unclassified = fields - implemented - NO_EFFECT - refused
    assert not unclassified, f"{path}: fields with no decision: {sorted(unclassified)}"
    assert not (implemented & refused) and not (NO_EFFECT & refused)


def test_every_refused_field_is_refused_when_asked(server) -> None:
    chat = request_fields(server, "/v1/chat/completions")
    refused = REFUSED["/v1/chat/completions"]
    assert refused <= set(ASK)
    for field in sorted(refused & chat):
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2, field: ASK[field]}  # fmt: skip
        r = server.post("/v1/chat/completions", body)
        assert r.status_code == 400, (field, r.text)
        err = r.json()["error"]
        assert err["param"] == field and err["code"] == "unsupported_parameter", err
