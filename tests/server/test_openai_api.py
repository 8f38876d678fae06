"""The OpenAI-compatible API through a live server: the real `openai` client (sync, async,
streaming) and raw httpx for the SSE wire format, re-validated against `openai.types`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from mara_serve.engine.agent import load_agent
from mara_serve.engine.loading import LoadedModel, render_chat
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.sampling import SamplingParams

BASE = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture()
def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
    )


def chat_stream_text(events: list[dict | str], n: int = 1) -> tuple[list[str], list[str | None]]:
    """Validate chat chunks; returns per-choice text and finish_reason."""
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    texts, finish, seen_role = [""] * n, [None] * n, [False] * n
    for ev in events[:-1]:
        assert isinstance(ev, dict) and "error" not in ev, ev
        chunk = ChatCompletionChunk.model_validate(ev)
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            i = choice.index
            if not seen_role[i]:
                assert choice.delta.role == "assistant", "role comes in the first delta"
                seen_role[i] = True
            assert finish[i] is None, "nothing after a choice's finish_reason"
            texts[i] += choice.delta.content or ""
            finish[i] = choice.finish_reason
    assert all(f in ("stop", "length") for f in finish), finish
    return texts, finish


# ---- basic shapes -------------------------------------------------------------------------


def test_models_lists_base_model_and_agents_with_parent(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert BASE in models and "half" in models
    assert models["half"].model_extra["parent"] == BASE
    assert models["half"].owned_by == "mara-serve"
    assert models[BASE].model_extra["parent"] is None
    assert client.models.retrieve("half").id == "half"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_raw_responses_validate_against_openai_types(server) -> None:
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    r = server.post("/v1/chat/completions", body)
    completion = ChatCompletion.model_validate(r.json())
    assert completion.object == "chat.completion" and completion.model == BASE
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5
    r = server.post("/v1/completions", {"model": BASE, "prompt": "Once upon", "max_tokens": 4})
    assert Completion.model_validate(r.json()).object == "text_completion"
    for m in httpx.get(server.base_url + "/v1/models", headers=server.auth).json()["data"]:
        Model.model_validate(m)


def test_sdk_sync_async_and_stream_agree(client: openai.OpenAI, aclient: openai.AsyncOpenAI):
    kwargs = {"model": BASE, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    full = client.chat.completions.create(**kwargs)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **kwargs)
        if c.choices
    )

    async def run_async() -> str:
        r = await aclient.chat.completions.create(**kwargs)
        return r.choices[0].message.content

    assert full.choices[0].message.content == streamed == asyncio.run(run_async())
    assert full.choices[0].message.content  # the tiny model says *something*


@pytest.mark.parametrize(
    "model,extra",
    [
        (BASE, {"temperature": 0}),  # greedy
        (BASE, {"temperature": 1.0, "seed": 7}),  # seeded sampling
        ("half", {}),  # MARA decoding is deterministic
    ],
)
def test_stream_text_equals_non_stream_text(server, model: str, extra: dict) -> None:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 16, **extra}
    r = server.post("/v1/chat/completions", body)
    full = ChatCompletion.model_validate(r.json())
    texts, finish = chat_stream_text(server.sse("/v1/chat/completions", {**body, "stream": True}))
    assert texts[0] == full.choices[0].message.content
    assert finish[0] == full.choices[0].finish_reason


def test_stream_include_usage_sends_a_final_usage_chunk(server) -> None:
    body = {
        "model": "half",
        "messages": MESSAGES,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = server.sse("/v1/chat/completions", body)
    last = ChatCompletionChunk.model_validate(events[-2])
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 6
    assert all("usage" not in e for e in events[:-2])
    non_stream = server.post(
        "/v1/chat/completions", {**body, "stream": False, "stream_options": None}
    ).json()
    assert non_stream["usage"] == last.usage.model_dump(exclude_none=True)


def test_sixteen_concurrent_streams_equal_each_request_alone(
    server, aclient: openai.AsyncOpenAI
) -> None:
    def kwargs(i: int) -> dict:
        return {
            "model": "half" if i % 2 else BASE,
            "max_tokens": 10,
            "temperature": 0,
            "messages": [{"role": "user", "content": f"Tell me about topic {i}."}],
        }

    async def one(i: int) -> str:
        text = ""
        async for chunk in await aclient.chat.completions.create(stream=True, **kwargs(i)):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text

    async def run() -> tuple[list[str], list[str]]:
        alone = [await one(i) for i in range(16)]
        together = await asyncio.gather(*(one(i) for i in range(16)))
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone
    assert len(set(alone)) > 8  # distinct prompts, distinct answers


def test_mara_output_equals_the_serial_reference(
    client: openai.OpenAI, tiny_lm: LoadedModel, agent_dir: Path
) -> None:
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    agent = load_agent(agent_dir / "half")
    prompt = render_chat(tiny_lm.tokenizer, messages)
    ref_ids, ref_traces = reference_generate(
        tiny_lm.model, prompt, agent, SamplingParams(max_new_tokens=24), tiny_lm.eos_token_ids
    )
    r = client.chat.completions.create(
        model="half", messages=messages, max_tokens=24, extra_body={"mara_trace": True}
    )
    trace = r.choices[0].model_extra["mara_trace"]
    assert [t["token_id"] for t in trace] == ref_ids
    assert [t["accepted_rank"] for t in trace] == [t.accepted_rank for t in ref_traces]
    assert any(t["rejected"] for t in trace), "the agent should reject something"
    text = tiny_lm.tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert r.choices[0].message.content == text


def test_mara_trace_in_stream_covers_every_token(server) -> None:
    body = {
        "model": "half",
        "messages": MESSAGES,
        "max_tokens": 8,
        "stream": True,
        "mara_trace": True,
        "stream_options": {"include_usage": True},
    }
    events = server.sse("/v1/chat/completions", body)
    entries = [
        t
        for e in events[:-1]
        if isinstance(e, dict)
        for c in e["choices"]
        for t in c.get("mara_trace", [])
    ]
    assert len(entries) == events[-2]["usage"]["completion_tokens"] == 8
    for t in entries:
        assert len(t["candidate_tokens"]) == len(t["candidates"]) == t["evaluated"]
        assert len(t["llm_probs"]) in (0, t["evaluated"])
        assert t["rejected"] == t["evaluated"] - (0 if t["fallback"] or not t["evaluated"] else 1)
        assert isinstance(t["token"], str) and 0 <= t["accepted_rank"] < t["num_candidates"]


def test_n_choices_use_seed_plus_index(client: openai.OpenAI, server) -> None:
    kwargs = {"model": BASE, "messages": MESSAGES, "max_tokens": 8, "temperature": 1.0}
    multi = client.chat.completions.create(n=3, seed=5, **kwargs)
    assert [c.index for c in multi.choices] == [0, 1, 2]
    singles = [
        client.chat.completions.create(seed=5 + i, **kwargs).choices[0].message.content
        for i in range(3)
    ]
    assert [c.message.content for c in multi.choices] == singles
    assert multi.usage.completion_tokens == 24
    texts, _ = chat_stream_text(
        server.sse("/v1/chat/completions", {**kwargs, "n": 3, "seed": 5, "stream": True}), n=3
    )
    assert texts == singles


def test_stop_strings_end_the_text_before_the_stop(client: openai.OpenAI, server):
    kwargs = {"model": BASE, "messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    assert len(full) > 12
    stop = full[6:10]  # four characters mid-text, usually spanning a token boundary
    expected = full[: full.find(stop)]
    r = client.chat.completions.create(stop=[stop, "never-occurs"], **kwargs)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 20  # the engine request was stopped early
    texts, finish = chat_stream_text(
        server.sse("/v1/chat/completions", {**kwargs, "stop": stop, "stream": True})
    )
    assert texts == [expected] and finish == ["stop"]
    unaffected = client.chat.completions.create(stop="never-occurs", **kwargs)
    assert unaffected.choices[0].message.content == full
    assert unaffected.choices[0].finish_reason == "length"


def test_unset_max_tokens_means_the_rest_of_the_context(
    client: openai.OpenAI, tiny_lm: LoadedModel
) -> None:
    content = "hello " * 200
    messages = [{"role": "user", "content": content}]
    prompt_len = len(render_chat(tiny_lm.tokenizer, messages))
    room = 512 - prompt_len  # the tiny model's context is 512
    assert 0 < room < 400
    messages[0]["content"] = content + "hello " * (room - 10)
    prompt_len = len(render_chat(tiny_lm.tokenizer, messages))
    r = client.chat.completions.create(
        model=BASE, messages=messages, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.completion_tokens == 512 - prompt_len
    assert r.choices[0].finish_reason == "length"
    ids = client.completions.create(
        model=BASE,
        prompt=[5] * 505,
        max_tokens=None,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert ids.usage.completion_tokens == 7


def test_completions_batch_prompts_echo_and_token_ids(client: openai.OpenAI, server):
    r = client.completions.create(
        model=BASE, prompt=["The cat", "A dog"], n=2, max_tokens=5, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    ids = server.post(
        "/v1/completions",
        {"model": BASE, "prompt": "The cat", "max_tokens": 5, "temperature": 0, "echo": True},
    ).json()
    assert ids["choices"][0]["text"] == "The cat" + r.choices[0].text
    tok = server.state.services.lm.tokenizer
    by_ids = client.completions.create(
        model=BASE, prompt=tok("The cat")["input_ids"], max_tokens=5, temperature=0
    )
    assert by_ids.choices[0].text == r.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=BASE, prompt="The cat", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_completions_stream_wire_format(server) -> None:
    events = server.sse(
        "/v1/completions",
        {
            "model": "half",
            "prompt": "Hi",
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert events[-1] == "[DONE]"
    assert all(c["finish_reason"] is None for e in events[:-3] for c in e["choices"])
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    # The API streams `finish_reason: null` before the end, but openai.types.Completion (used for
    # chunks too) types it as required; validate everything else of those chunks.
    for e in events[:-1]:
        e = {
            **e,
            "choices": [
                {**c, "finish_reason": c["finish_reason"] or "length"} for c in e["choices"]
            ],
        }
        Completion.model_validate(e)
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 4


def test_user_and_openai_only_fields_are_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "developer", "content": "Be brief."}, *MESSAGES],
        max_completion_tokens=3,
        user="alice",
        seed=1,
        presence_penalty=0,
        frequency_penalty=0,
        response_format={"type": "text"},
        tool_choice="none",
        temperature=0,
        top_p=0.9,
        metadata={"team": "a"},
        store=False,
        service_tier="auto",
        extra_body={"top_k": 5, "ignore_eos": True},
    )
    assert r.usage.completion_tokens == 3


# vLLM extension fields with a value that asks for behaviour this server does not implement
VLLM_ASKS = {
    "guided_decoding_backend": "xgrammar",
}


@pytest.mark.parametrize("field", sorted(VLLM_ASKS))
def test_vllm_extensions_are_refused_never_ignored(client: openai.OpenAI, field: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=BASE, messages=MESSAGES, max_tokens=2, extra_body={field: VLLM_ASKS[field]}
        )
    err = e.value.body
    assert err["param"] == field and err["code"] == "unsupported_parameter", err
    assert field in err["message"]


def test_vllm_extensions_at_their_off_value_are_accepted(client: openai.OpenAI) -> None:
    off = {"repetition_penalty": 1.0, "min_tokens": 0, "include_stop_str_in_output": False,
           "skip_special_tokens": True, "echo": False, "add_generation_prompt": True,
           "continue_final_message": False, "guided_json": None, "min_p": 0}  # fmt: skip
    r = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2,
                                       extra_body=off)  # fmt: skip
    assert r.usage.completion_tokens == 2
    off = {"repetition_penalty": 1, "min_tokens": 0}
    r = client.completions.create(model=BASE, prompt="Hi", max_tokens=2, extra_body=off)
    assert r.usage.completion_tokens == 2


def test_vllm_prompt_and_stop_fields(client: openai.OpenAI, tiny_lm: LoadedModel) -> None:
    """continue_final_message continues the assistant's text (the prompt ends inside its turn);
    add_generation_prompt: false leaves the turn unopened; include_stop_str_in_output keeps
    the stop string."""
    tok = tiny_lm.tokenizer
    turn = [*MESSAGES, {"role": "assistant", "content": "Sure, here"}]
    r = client.chat.completions.create(model=BASE, messages=turn, max_tokens=2,
                                       extra_body={"continue_final_message": True,
                                                   "add_generation_prompt": False})  # fmt: skip
    want = tok.apply_chat_template(turn, tokenize=False, continue_final_message=True)
    assert want.endswith("Sure, here")
    assert r.usage.prompt_tokens == len(tok(want, add_special_tokens=False)["input_ids"])
    r = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2,
                                       extra_body={"add_generation_prompt": False})  # fmt: skip
    bare = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert r.usage.prompt_tokens == len(tok(bare, add_special_tokens=False)["input_ids"])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2,
                                       extra_body={"continue_final_message": True})  # fmt: skip
    assert e.value.body["param"] == "continue_final_message"

    base = dict(model=BASE, messages=MESSAGES, max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True})  # fmt: skip
    full = client.chat.completions.create(**base).choices[0].message.content
    stop = full[3:5]
    assert stop and stop not in full[:3]
    cut = client.chat.completions.create(**base, stop=[stop]).choices[0].message.content
    kept = client.chat.completions.create(
        **{**base, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}},
        stop=[stop],
    ).choices[0].message.content  # fmt: skip
    assert cut == full[:3] and kept == full[:5]


def test_return_token_ids(client: openai.OpenAI, tiny_lm: LoadedModel) -> None:
    extra = {"return_token_ids": True, "ignore_eos": True}
    r = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=5,
                                       temperature=0, extra_body=extra)  # fmt: skip
    prompt = r.model_extra["prompt_token_ids"]
    assert len(prompt) == r.usage.prompt_tokens
    assert prompt == render_chat(tiny_lm.tokenizer, MESSAGES)
    ids = r.choices[0].model_extra["token_ids"]
    assert len(ids) == 5 and tiny_lm.tokenizer.decode(ids) == r.choices[0].message.content
    streamed, streamed_prompt = [], None
    for chunk in client.chat.completions.create(
        model=BASE, messages=MESSAGES, max_tokens=5, temperature=0, stream=True, extra_body=extra
    ):
        streamed_prompt = streamed_prompt or (chunk.model_extra or {}).get("prompt_token_ids")
        for c in chunk.choices:
            streamed += (c.model_extra or {}).get("token_ids") or []
    assert streamed == ids and streamed_prompt == prompt
    r = client.completions.create(model=BASE, prompt=[0, 5, 9], max_tokens=3, temperature=0,
                                  extra_body=extra)  # fmt: skip
    choice = r.choices[0].model_extra
    assert choice["prompt_token_ids"] == [0, 5, 9] and len(choice["token_ids"]) == 3


def test_allowed_token_ids_and_truncate_prompt_tokens(
    client: openai.OpenAI, tiny_lm: LoadedModel
) -> None:
    allowed = [7, 9, 11]
    texts = {tiny_lm.tokenizer.decode([i]) for i in allowed}
    for model in (BASE, "half"):
        r = client.completions.create(
            model=model,
            prompt=[0, 5, 9, 3],
            max_tokens=8,
            logprobs=0,
            extra_body={"allowed_token_ids": allowed},
        )
        tokens = r.choices[0].logprobs.tokens
        assert len(tokens) == 8 and set(tokens) <= texts, tokens
    r = client.completions.create(model=BASE, prompt=list(range(3, 40)), max_tokens=2,
                                  extra_body={"truncate_prompt_tokens": 5})  # fmt: skip
    assert r.usage.prompt_tokens == 5
    r = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2,
                                       extra_body={"truncate_prompt_tokens": 6})  # fmt: skip
    assert r.usage.prompt_tokens == 6


def test_penalties_and_logit_bias_through_the_sdk(client: openai.OpenAI) -> None:
    base = dict(model=BASE, messages=MESSAGES, max_tokens=6, temperature=0,
                extra_body={"ignore_eos": True})  # fmt: skip
    forced = client.chat.completions.create(**base, logit_bias={"7": 100})
    text = forced.choices[0].message.content
    plain = client.chat.completions.create(**base).choices[0].message.content
    assert text != plain and forced.usage.completion_tokens == 6
    penalised = client.chat.completions.create(
        **base, logit_bias={"7": 100}, frequency_penalty=2, presence_penalty=2
    )
    assert penalised.choices[0].message.content == text  # +100 outweighs any penalty here
    r = client.chat.completions.create(**{**base, "extra_body": {
        "ignore_eos": True, "repetition_penalty": 1.5, "min_tokens": 2}})  # fmt: skip
    assert r.usage.completion_tokens == 6


def test_unknown_fields_are_a_400_naming_them(client: openai.OpenAI) -> None:
    for call in (
        lambda b: client.chat.completions.create(model=BASE, messages=MESSAGES, extra_body=b),
        lambda b: client.completions.create(model=BASE, prompt="Hi", extra_body=b),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call({"some_future_field": {"x": 1}})
        assert e.value.body["param"] == "some_future_field", e.value.body
        assert e.value.body["code"] == "extra_forbidden"
    with pytest.raises(openai.BadRequestError) as e:  # completions: a vLLM field refused too
        client.completions.create(model=BASE, prompt="Hi", extra_body={"use_beam_search": True})
    assert e.value.body["param"] == "use_beam_search"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=BASE, messages=MESSAGES, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )  # fmt: skip
    assert e.value.body["param"] == "stream_options.continuous_usage_stats"


def test_min_p_one_samples_like_greedy(client: openai.OpenAI) -> None:
    greedy = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=6,
                                            temperature=0)  # fmt: skip
    for seed in (1, 2):
        r = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=6,
                                           temperature=1.3, seed=seed,
                                           extra_body={"min_p": 1.0})  # fmt: skip
        assert r.choices[0].message.content == greedy.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt="Hi", extra_body={"min_p": 1.5})
    assert e.value.body["param"] == "min_p"


def test_chat_echo_prepends_the_continued_assistant_message(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Describe the sky."},
                {"role": "assistant", "content": "The sky is"}]  # fmt: skip
    extra = {"continue_final_message": True, "add_generation_prompt": False}
    plain = client.chat.completions.create(model=BASE, messages=messages, max_tokens=4,
                                           temperature=0, extra_body=extra)  # fmt: skip
    echo = {**extra, "echo": True}
    echoed = client.chat.completions.create(model=BASE, messages=messages, max_tokens=4,
                                            temperature=0, extra_body=echo)  # fmt: skip
    assert echoed.choices[0].message.content == "The sky is" + plain.choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=BASE, messages=messages, max_tokens=4,
                                                temperature=0, stream=True,
                                                extra_body={**extra, "echo": True})
        if c.choices
    )  # fmt: skip
    assert streamed == echoed.choices[0].message.content
    # the last message is the user's: nothing to echo
    r = client.chat.completions.create(model=BASE, messages=messages[:1], max_tokens=4,
                                       temperature=0, extra_body={"echo": True})  # fmt: skip
    assert not r.choices[0].message.content.startswith("Describe")


def test_bad_words_are_never_generated(client: openai.OpenAI) -> None:
    kwargs = dict(model=BASE, prompt="The cat", max_tokens=6, temperature=0, logprobs=0)
    plain = client.completions.create(**kwargs, extra_body={"return_token_ids": True}).choices[0]
    # a generated token that is a plain word (the tiny model also emits partial characters)
    j, word = next((j, t.strip()) for j, t in enumerate(plain.logprobs.tokens)
                   if t.strip().isascii() and t.strip().isalpha())  # fmt: skip
    banned = client.completions.create(**kwargs, extra_body={"bad_words": [word],
                                                             "return_token_ids": True})  # fmt: skip
    ids = banned.choices[0].model_extra["token_ids"]
    assert plain.model_extra["token_ids"][j] not in ids
    assert word not in [t.strip() for t in banned.choices[0].logprobs.tokens]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kwargs, extra_body={"bad_words": [""]})
    assert e.value.body["param"].startswith("bad_words")


def test_skip_special_tokens_false_keeps_them_in_the_text(client: openai.OpenAI, tiny_lm) -> None:
    tok = tiny_lm.tokenizer
    special = next(i for i in tok.all_special_ids if i not in tiny_lm.eos_token_ids)
    kwargs = dict(model=BASE, prompt="The cat", max_tokens=3, temperature=0,
                  logit_bias={str(special): 100})  # fmt: skip
    hidden = client.completions.create(**kwargs).choices[0].text
    shown = client.completions.create(**kwargs, extra_body={"skip_special_tokens": False})
    assert hidden == ""
    assert shown.choices[0].text == tok.decode([special] * 3, skip_special_tokens=False)


TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if shout %}!!!{% endif %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_request_chat_templates_only_when_trusted(client: openai.OpenAI, start_server) -> None:
    with pytest.raises(openai.BadRequestError) as e:  # off by default: a template runs code
        client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2,
                                       extra_body={"chat_template": TEMPLATE})  # fmt: skip
    assert e.value.body["param"] == "chat_template"
    with pytest.raises(openai.BadRequestError) as e:
        reserved = {"chat_template_kwargs": {"tokenize": False}}
        client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2,
                                       extra_body=reserved)  # fmt: skip
    assert e.value.body["param"] == "chat_template_kwargs"
    live = start_server(trust_request_chat_template=True)
    trusted = openai.OpenAI(base_url=live.base_url + "/v1", api_key="x", max_retries=0)
    r = trusted.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_body={"chat_template": TEMPLATE, "chat_template_kwargs": {"shout": True},
                    "return_token_ids": True},
    )  # fmt: skip
    prompt = httpx.post(
        live.base_url + "/detokenize",
        json={"model": BASE, "tokens": r.model_extra["prompt_token_ids"]},
    ).json()
    assert prompt["prompt"] == "<user>Hi!!!<assistant>"
    with pytest.raises(openai.BadRequestError) as e:  # a broken template is a 400, not a 500
        trusted.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2,
                                        extra_body={"chat_template": "{% for %}"})  # fmt: skip
    assert e.value.body["param"] == "chat_template"
