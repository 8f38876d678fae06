"""OpenAI `logprobs` through the real SDK: shapes, values checked against the model's own
log-softmax, streaming equal to non-streaming, and MARA's distance from the model's choice."""

from __future__ import annotations

import openai
import pytest
import torch

from mara_serve.engine.loading import LoadedModel

BASE = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


def model_logprobs(lm: LoadedModel, prompt: list[int], generated: list[int]) -> list[torch.Tensor]:
    """log_softmax (float32, full vocabulary) of the model at each generated token's step."""
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt + generated])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[len(prompt) - 1 + j] for j in range(len(generated))]


def test_completion_logprobs_are_the_models_log_softmax(client, tiny_lm) -> None:
    prompt = [0, 5, 9, 3, 7]
    r = client.completions.create(model=BASE, prompt=prompt, max_tokens=6, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(6)]
    gen: list[int] = []  # the model's own greedy tokens, step by step
    for _ in range(6):
        gen.append(int(torch.argmax(model_logprobs(tiny_lm, prompt + gen, [0])[0])))
    want = model_logprobs(tiny_lm, prompt, gen)
    for j in range(6):
        assert lp.token_logprobs[j] == pytest.approx(float(want[j][gen[j]]), abs=1e-4)
        top = torch.topk(want[j], 3)
        got = lp.top_logprobs[j]
        assert len(got) == 3
        assert sorted(got.values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert r.choices[0].text == tiny_lm.tokenizer.decode(gen)


def test_chat_logprobs_shape_stream_equals_full(client) -> None:
    kwargs = dict(model=BASE, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                  top_logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    full = client.chat.completions.create(**kwargs)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == 8
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        # greedy: the emitted token is the model's most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.token == entry.top_logprobs[0].token
    text = bytes(b for e in content for b in e.bytes).decode("utf-8")
    assert text == full.choices[0].message.content

    streamed = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    # same tokens; logprobs equal up to float rounding (the second request reuses the first
    # one's cached prompt prefix, so its forward has other shapes: on an AVX512 CPU the 5th
    # decimal moved, -2.42685 vs -2.42684)
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_mara_logprobs_show_the_agents_distance_from_the_model(client) -> None:
    r = client.chat.completions.create(
        model="half", messages=MESSAGES, max_tokens=16, logprobs=True, top_logprobs=1,
        extra_body={"ignore_eos": True, "mara_trace": True},
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    trace = r.choices[0].model_extra["mara_trace"]
    assert len(content) == 16
    moved = [e for e, t in zip(content, trace, strict=True) if t["accepted_rank"] > 0]
    assert moved, "the half agent rejected some top-1 candidates"
    for e in moved:  # the agent emitted a token the model ranked below its top-1
        assert e.logprob < e.top_logprobs[0].logprob


def test_logprobs_requests_that_cannot_be_served_are_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=MESSAGES, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=MESSAGES, logprobs=True,
                                       top_logprobs=21)  # fmt: skip
    assert e.value.body["param"] == "top_logprobs"


def test_prompt_logprobs_are_the_models_log_softmax(client, tiny_lm) -> None:
    """vLLM's prompt_logprobs: per prompt position None first, then {token id: {logprob, rank,
    decoded_token}} with the prompt's own token and the k most likely ones, checked against
    the model's log-softmax; each completions prompt gets its own."""
    prompts = [[0, 5, 9, 3, 7], [0, 11, 12]]
    r = client.completions.create(model=BASE, prompt=prompts, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 2})  # fmt: skip
    assert len(r.choices) == 2
    for prompt, choice in zip(prompts, r.choices, strict=True):
        plp = choice.model_extra["prompt_logprobs"]
        assert len(plp) == len(prompt) and plp[0] is None
        want = model_logprobs(tiny_lm, prompt[:1], prompt[1:])
        for t, (token, entries) in enumerate(zip(prompt[1:], plp[1:], strict=True)):
            assert str(token) in entries and len(entries) in (2, 3)
            mine = entries[str(token)]
            assert mine["logprob"] == pytest.approx(float(want[t][token]), abs=1e-4)
            assert mine["rank"] == int((want[t] > want[t][token]).sum()) + 1
            assert mine["decoded_token"] == tiny_lm.tokenizer.decode([token])
            best = max(entries.values(), key=lambda e: e["logprob"])
            assert best["rank"] == 1
            assert best["logprob"] == pytest.approx(float(want[t].max()), abs=1e-4)


def test_chat_prompt_logprobs_cover_the_templated_prompt(client) -> None:
    r = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2,
                                       extra_body={"prompt_logprobs": 0,
                                                   "return_token_ids": True})  # fmt: skip
    plp, ids = r.model_extra["prompt_logprobs"], r.model_extra["prompt_token_ids"]
    assert len(plp) == len(ids) == r.usage.prompt_tokens and plp[0] is None
    assert all(list(e) == [str(t)] for e, t in zip(plp[1:], ids[1:], strict=True))
    with pytest.raises(openai.BadRequestError) as e:  # as vLLM: not with stream
        client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2, stream=True,
                                       extra_body={"prompt_logprobs": 1})  # fmt: skip
    assert e.value.body["param"] == "prompt_logprobs"


def test_completions_echo_with_logprobs_covers_the_prompt(client, tiny_lm) -> None:
    """OpenAI's legacy echo + logprobs: the prompt's tokens first (the first with null), then
    the generated ones, offsets into the echoed text; streamed: the prompt's in the first
    chunk."""
    text = "The cat sat on the mat"
    kwargs = dict(model=BASE, prompt=text, max_tokens=3, temperature=0, logprobs=2, echo=True,
                  extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    r = client.completions.create(**kwargs)
    choice, lp = r.choices[0], r.choices[0].logprobs
    prompt = choice.model_extra["prompt_token_ids"]
    P = len(prompt)
    assert len(lp.tokens) == P + 3 and choice.text.startswith(text)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = model_logprobs(tiny_lm, prompt[:1], prompt[1:])
    for t, token in enumerate(prompt[1:]):
        assert lp.token_logprobs[1 + t] == pytest.approx(float(want[t][token]), abs=1e-4)
        assert len(lp.top_logprobs[1 + t]) == 2
    assert lp.text_offset[0] == 0 and lp.text_offset[P] == len(text)
    assert "".join(lp.tokens[P:]) == choice.text[len(text) :]
    chunks = list(client.completions.create(stream=True, **kwargs))
    first = chunks[0].choices[0]
    assert first.text == text and first.logprobs.tokens == lp.tokens[:P]
    streamed = [x for c in chunks for ch in c.choices if ch.logprobs
                for x in ch.logprobs.token_logprobs]  # fmt: skip
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


def test_completions_echo_with_max_tokens_0_scores_the_prompt(client, tiny_lm, server) -> None:
    """OpenAI's legacy scoring call (evaluation harnesses' loglikelihood): echo, logprobs and
    max_tokens 0 return the prompt and its tokens' log-probabilities, nothing generated, for a
    prompt that fills the whole context too."""
    text = "The cat sat on the mat"
    kwargs = dict(model=BASE, prompt=[text, "A dog"], max_tokens=0, logprobs=1, echo=True,
                  extra_body={"return_token_ids": True})  # fmt: skip
    r = client.completions.create(**kwargs)
    assert [c.text for c in r.choices] == [text, "A dog"]
    assert all(c.finish_reason == "length" for c in r.choices)
    choice, lp = r.choices[0], r.choices[0].logprobs
    prompt = choice.model_extra["prompt_token_ids"]
    assert choice.model_extra["token_ids"] == []
    assert len(lp.tokens) == len(prompt) and lp.token_logprobs[0] is None
    want = model_logprobs(tiny_lm, prompt[:1], prompt[1:])
    for t, token in enumerate(prompt[1:]):
        assert lp.token_logprobs[1 + t] == pytest.approx(float(want[t][token]), abs=1e-4)
    n_prompt = len(prompt) + len(r.choices[1].model_extra["prompt_token_ids"])
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == n_prompt
    chunks = list(client.completions.create(stream=True, **kwargs))
    texts = {ch.index: ch.text for c in chunks for ch in c.choices if ch.text}
    assert texts == {0: text, 1: "A dog"}
    assert sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason) == [0, 1]
    # a prompt of the whole context: nothing is left to generate, and nothing needs to be
    full = [5] * server.state.engine.engine.max_model_len
    r = client.completions.create(model=BASE, prompt=full, max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].finish_reason == "length" and len(r.choices[0].logprobs.tokens) == len(full)
