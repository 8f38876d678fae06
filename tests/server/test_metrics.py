"""/metrics: the documented families exist, and counters move exactly with the traffic."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from mara_serve.server.metrics import METRIC_NAMES

BASE = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Count to five."}]


@pytest.fixture()
def live(start_server, agent_dir: Path):
    """A fresh server (no keys), so the counters start from zero."""
    return start_server(agents={"half": agent_dir / "half", "reject": agent_dir / "reject"})


def test_every_documented_family_is_exported(live) -> None:
    text = httpx.get(live.base_url + "/metrics").text
    types = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    for name in METRIC_NAMES:
        family = name.removesuffix("_total")
        assert family in types or name in types, name
    assert 'mara_agent_loads_total{agent="half"} 1.0' in text
    assert "_created" not in text


def test_counters_follow_a_mara_request(live) -> None:
    before = {
        n: live.metric(n) for n in ("mara_prompt_tokens_total", "mara_generation_tokens_total")
    }
    body = {"model": "half", "messages": MESSAGES, "max_tokens": 12, "mara_trace": True}
    r = live.post("/v1/chat/completions", body).json()
    trace, usage = r["choices"][0]["mara_trace"], r["usage"]
    judged = [t for t in trace if t["evaluated"]]
    assert live.metric("mara_requests_total", {"status": "success"}) == 1
    assert (
        live.metric("mara_prompt_tokens_total")
        == before["mara_prompt_tokens_total"] + usage["prompt_tokens"]
    )
    assert live.metric("mara_generation_tokens_total") == usage["completion_tokens"]
    assert live.metric("mara_agent_candidates_total", {"agent": "half"}) == sum(
        t["evaluated"] for t in trace
    )
    assert (
        live.metric("mara_agent_rejections_total", {"agent": "half"})
        == sum(t["rejected"] for t in trace)
        > 0
    )
    assert live.metric("mara_agent_accepted_rank_count", {"agent": "half"}) == len(judged)
    assert live.metric("mara_agent_accepted_rank_sum", {"agent": "half"}) == sum(
        t["accepted_rank"] for t in judged
    )
    assert live.metric("mara_time_to_first_token_seconds_count") == 1
    assert live.metric("mara_e2e_request_latency_seconds_count") == 1
    assert live.metric("mara_queue_time_seconds_count") == 1
    assert live.metric("mara_inter_token_latency_seconds_count") == usage["completion_tokens"] - 1


def test_fallbacks_count_tokens_where_every_candidate_was_rejected(live) -> None:
    body = {"model": "reject", "messages": MESSAGES, "max_tokens": 6, "mara_trace": True, "n": 2}
    r = live.post("/v1/chat/completions", body).json()
    judged = [t for c in r["choices"] for t in c["mara_trace"] if t["evaluated"]]
    assert judged and all(t["fallback"] and t["accepted_rank"] == 0 for t in judged)
    assert live.metric("mara_agent_fallbacks_total", {"agent": "reject"}) == len(judged)
    assert live.metric("mara_agent_rejections_total", {"agent": "reject"}) == sum(
        t["evaluated"] for t in judged
    )
    assert live.metric("mara_agent_fallbacks_total", {"agent": "half"}) == 0


def test_base_model_requests_touch_no_agent_series(live) -> None:
    r = live.post("/v1/completions", {"model": BASE, "prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 200
    assert live.metric("mara_generation_tokens_total") == 4
    for agent in ("half", "reject"):
        assert live.metric("mara_agent_candidates_total", {"agent": agent}) == 0


def test_rejected_and_streamed_requests_are_counted(live) -> None:
    r = live.post(
        "/v1/chat/completions", {"model": BASE, "messages": MESSAGES, "max_tokens": 10_000}
    )
    assert r.status_code == 400
    assert live.metric("mara_requests_total", {"status": "rejected"}) == 1
    events = live.sse(
        "/v1/chat/completions",
        {"model": "half", "messages": MESSAGES, "max_tokens": 3, "stream": True},
    )
    assert events[-1] == "[DONE]"
    assert live.metric("mara_requests_total", {"status": "success"}) == 1
    assert live.metric("mara_num_requests_running") == 0
    assert live.metric("mara_num_requests_waiting") == 0


def test_prefix_cache_counters_follow_shared_prompts(live) -> None:
    """Two prompts sharing 40 tokens: the second reuses the first one's blocks."""
    shared = [5 + i % 90 for i in range(40)]
    for tail in ([7, 8, 9], [10, 11]):
        body = {"model": "half", "prompt": shared + tail, "max_tokens": 2}
        assert live.post("/v1/completions", body).status_code == 200
    assert live.metric("mara_prefix_cache_queried_tokens_total") >= 43 + 42
    assert live.metric("mara_prefix_cache_hit_tokens_total") >= 32
    assert live.metric("mara_prefix_cache_tokens") >= 32


def test_the_kv_cache_budget_shows_in_metrics_and_models(start_server, tiny_lm) -> None:
    """--kv-cache-memory fixes the slots (a gauge) and, below one full-length sequence, the
    context the API advertises and enforces. The tiny model: 512 bytes per token (2 layers x 2
    kv heads x 16 dims x K,V x 4 bytes); a slot holds its context + 256 candidate positions."""
    slot = 512 * (tiny_lm.max_model_len + 256)
    live = start_server(kv_cache_memory=2 * slot + 100, prefix_cache_tokens=0)
    assert live.metric("mara_kv_cache_slots") == 2
    assert live.metric("mara_kv_cache_bytes") == 2 * slot
    assert live.metric("mara_kv_cache_usage_perc") == 0
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": 4}
    assert live.post("/v1/chat/completions", body).status_code == 200
    assert live.metric("mara_kv_cache_tokens") == 0  # nothing held once it finished

    # 96 prefix-cache tokens of the budget are reserved; what is left holds 100 tokens + scratch
    live = start_server(kv_cache_memory=(96 + 100 + 256) * 512, prefix_cache_tokens=96)
    models = httpx.get(live.base_url + "/v1/models").json()["data"]
    assert {m["max_model_len"] for m in models} == {100}
    r = live.post("/v1/chat/completions", {**body, "max_tokens": 200})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "100 tokens" in r.json()["error"]["message"]
