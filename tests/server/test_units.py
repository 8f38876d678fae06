"""The server's pure pieces without HTTP: detokenizer, stop strings, error table, settings, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from mara_serve.cli.main import build_parser, main
from mara_serve.cli.serve import settings_from
from mara_serve.engine.default_model import default_cache_dir, ensure_default_model
from mara_serve.engine.errors import (
    AgentLoadError,
    ContextLengthExceededError,
    EngineNotReadyError,
    InvalidRequestError,
    QueueFullError,
)
from mara_serve.server.errors import ModelNotFoundError, describe
from mara_serve.server.serving.detokenizer import IncrementalDetokenizer
from mara_serve.server.serving.stop import StopStringMatcher
from mara_serve.server.settings import Settings

TEXTS = [
    "Hello, world! How are you today?",
    "Café au lait — naïve façade; 東京は雨です。🙂👍🏽 and 🇫🇷 flags",
    "  leading spaces\n\nand\ttabs  ",
    "数学: ∑_{i=1}^n i = n(n+1)/2 ✓",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_default_model(default_cache_dir()))


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_never_emits_half_a_character(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push([i]) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    if "🙂" in text:  # an emoji spans several tokens: some pushes must hold their bytes back
        assert "" in deltas[:-1]


def test_detokenizer_drops_a_character_cut_at_the_end(tokenizer) -> None:
    """max_tokens reached inside an emoji: the text ends before it, never in U+FFFD."""
    head = tokenizer("ok", add_special_tokens=False)["input_ids"]
    emoji = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(emoji) > 1, "an emoji is several byte-level tokens"
    detok = IncrementalDetokenizer(tokenizer)
    text = detok.push(head)
    for i in emoji[:-1]:  # the generation stops before the emoji's last byte
        text += detok.push([i])
    text += detok.flush()
    assert text == "ok"


def reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


@pytest.mark.parametrize("seed", range(40))
def test_stop_strings_match_across_any_split(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "abc "
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    matcher, out, hit = StopStringMatcher(stops), "", False
    pos = 0
    while pos < len(text) and not hit:
        step = rng.randint(1, 5)
        emitted, hit = matcher.push(text[pos : pos + step])
        out += emitted
        pos += step
        assert not any(s in out for s in stops), "the stop text is never emitted"
    if not hit:
        out += matcher.flush()
    assert (out, hit) == reference_stop(text, stops)


@pytest.mark.parametrize(
    "exc,status,code,retry",
    [
        (InvalidRequestError("bad", "top_k"), 400, "invalid_value", None),
        (ContextLengthExceededError("long", "messages"), 400, "context_length_exceeded", None),
        (AgentLoadError("nope"), 400, "invalid_agent", None),
        (QueueFullError("full"), 429, "queue_full", "1"),
        (EngineNotReadyError("stopping"), 503, "engine_not_ready", "5"),
        (ModelNotFoundError("x", param="model"), 404, "model_not_found", None),
        (RuntimeError("secret internals"), 500, "internal_error", None),
    ],
)
def test_error_table(exc: Exception, status: int, code: str, retry: str | None) -> None:
    p = describe(exc)
    assert (p.status_code, p.code, p.headers.get("Retry-After")) == (status, code, retry)
    assert set(p.body()["error"]) == {"message", "type", "param", "code"}
    assert "secret" not in p.message


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MARA_PORT", "9001")
    monkeypatch.setenv("MARA_AGENTS", "a=/p/a, b=/p/b")
    monkeypatch.setenv("MARA_CORS_ORIGINS", "http://x.test,http://y.test")
    monkeypatch.setenv("MARA_AGENT_DIR", str(tmp_path))
    monkeypatch.setenv("MARA_API_KEY", "")
    s = Settings()
    assert s.port == 9001 and s.agent_dir == tmp_path and s.api_key is None
    assert s.agents == {"a": "/p/a", "b": "/p/b"}  # as given: a path or hf://ORG/REPO/PATH
    assert s.cors_origins == ["http://x.test", "http://y.test"]


@pytest.mark.parametrize(
    "env,value",
    [
        ("MARA_AGENTS", "no-equals-sign"),
        ("MARA_AGENTS", "a=/x,a=/y"),
        ("MARA_AGENTS", "b c=/x"),
        ("MARA_PORT", "0"),
        ("MARA_MAX_CONCURRENT", "0"),
        ("MARA_AGENT_DIR", "/no/such/dir"),
        ("MARA_DTYPE", "float8"),
        ("MARA_LOG_LEVEL", "loud"),
    ],
)
def test_invalid_settings_fail_fast(monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError):
        Settings()


def test_unknown_mara_variables_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARA_MAX_CONCURENT", "4")  # a typo
    assert "MARA_MAX_CONCURENT" in Settings.unknown_env_vars()
    assert "MARA_PORT" not in Settings.unknown_env_vars()


def test_api_and_admin_keys_must_differ() -> None:
    with pytest.raises(ValidationError):
        Settings(api_key="same", admin_key="same")


def test_cli_flags_override_env_and_absent_flags_keep_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARA_MAX_WAITING", "7")
    monkeypatch.setenv("MARA_PORT", "9000")
    args = build_parser().parse_args(
        [
            "serve",
            "--port",
            "8123",
            "--agent",
            "a=/x",
            "--agent",
            "b=/y",
            "--no-default-agents",
            "--api-key",
            "k",
            "--dtype",
            "float32",
        ]
    )
    s = settings_from(args)
    assert (s.port, s.max_waiting, s.default_agents, s.dtype) == (8123, 7, False, "float32")
    assert s.agents == {"a": "/x", "b": "/y"}
    assert s.api_key is not None and s.api_key.get_secret_value() == "k"
    assert s.host == "127.0.0.1"


def test_every_setting_is_a_serve_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    for name in Settings.model_fields:
        flag = "--" + {"agents": "agent"}.get(name, name).replace("_", "-")
        assert flag in help_text, f"mara serve has no {flag} flag for setting {name!r}"
        assert f"MARA_{name.upper()}" in help_text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    top = capsys.readouterr().out
    for command in ("generate", "serve", "train", "eval", "fetch-default"):
        assert command in top


def test_cli_rejects_invalid_settings_with_status_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--port", "70000"]) == 2
    assert "port" in capsys.readouterr().err


WEATHER_TOOL = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def stream_calls(pieces: list[str], forced: bool = False) -> tuple[list[str], list | None]:
    """Feed `pieces` to a CallStream; (content sent after each piece, the calls at the end)."""
    from mara_serve.server.serving.tools import CallStream

    s, sent, calls = CallStream(WEATHER_TOOL, forced), [], None
    for i, piece in enumerate(pieces):
        text, calls = s.feed(piece, i == len(pieces) - 1)
        sent.append(text)
    return sent, calls


def test_streamed_text_under_tools_goes_out_at_once_and_calls_are_held() -> None:
    from mara_serve.server.serving.tools import split_calls

    # plain text streams piece by piece; a "<tool" at the end is held until it cannot be a tag
    assert stream_calls(["The weather", " is <to", "day nice", "."]) == (
        ["The weather", " is ", "<today nice", "."], None)  # fmt: skip
    # a bare call: nothing goes out as content, the call comes at the end
    sent, calls = stream_calls([" ", CALL[:10], CALL[10:30], CALL[30:]])
    assert "".join(sent) == "" and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    # text, then a Hermes block: the text is content, the block the call
    block = f"<tool_call>\n{CALL}\n</tool_call>"
    sent, calls = stream_calls(["Let me check. <tool", block[5:20], block[20:]])
    assert sent == ["Let me check. ", "", ""] and calls[0]["function"]["name"] == "get_weather"
    assert split_calls("Let me check. " + block, WEATHER_TOOL)[0] == "Let me check."
    # what looked like a call and is not: the held text goes out as content at the end
    assert stream_calls(["{not", " json}"]) == (["", "{not json}"], None)
    assert split_calls("{not json}", WEATHER_TOOL) == ("{not json}", None)
    # an unknown function is no call
    other = CALL.replace("get_weather", "launch")
    assert stream_calls([other]) == ([other], None)
    # a forced call holds even text that could never be one
    assert stream_calls(["Hello", " there"], forced=True) == (["", "Hello there"], None)


def test_a_bare_call_after_streamed_text_is_content_as_in_a_whole_reply() -> None:
    from mara_serve.server.serving.tools import split_calls

    # the call arrives in the last piece, after text went out: not a call, as split_calls says
    assert stream_calls(["Sure: ", CALL]) == (["Sure: ", CALL], None)
    assert split_calls("Sure: " + CALL, WEATHER_TOOL) == ("Sure: " + CALL, None)
