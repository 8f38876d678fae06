"""Tool calling for /v1/chat/completions: render the tools, constrain or parse the calls.

Rendering: a chat template that knows tools (it renders differently when given them) gets them
natively, with the conversation's tool calls and results in transformers' message format. A
template that ignores them (SmolLM2's) gets them in the system message instead, with one
instruction: to call a function, answer with only `{"name": ..., "arguments": {...}}`.

Choosing: `tool_choice` "required" or a named function constrains the output with a grammar
(structured.py) to exactly such an object whose arguments follow the function's JSON schema, so
the call always parses — in MARA mode the agent judges only tokens that keep it valid. With
"auto" the output is free; it is a call when it parses as one (a bare object as above, a list
of them, or `<tool_call>…</tool_call>` blocks as Hermes/Qwen templates write, after which any
text before the first block is the message's content) naming a known function. "none": the
tools are not shown and no call is parsed.

Streaming with "auto" (`CallStream`): text that cannot start a call streams as content at once;
only what may still become one (an opening `{` or `[`, a `<tool_call>` or a prefix of it) is
held until the choice ends, so a chat front end with tools enabled still streams plain answers.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from mara_serve.server.errors import APIError

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_TAG = "<tool_call>"


def tools_active(body: Any) -> bool:
    return bool(body.tools) and body.tool_choice != "none"


def call_forced(body: Any) -> bool:
    """ "required" or a named function: the output must be one call (grammar-constrained)."""
    return tools_active(body) and (body.tool_choice == "required" or named_choice(body) is not None)


def named_choice(body: Any) -> str | None:
    choice = body.tool_choice
    return choice.function.name if choice is not None and not isinstance(choice, str) else None


def system_text(tools: list[dict[str, Any]]) -> str:
    specs = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call these functions:\n" + specs + "\nTo call a function, answer with only a "
        'JSON object {"name": <function name>, "arguments": <arguments object>}.'
    )


def template_messages(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools for the template): native when the template renders tools, else the
    tools described in the system message (and tool calls / results written as text)."""
    if _template_knows_tools(tokenizer, tools):
        return messages, tools
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in m["tool_calls"]]  # fmt: skip
            text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            out.append({"role": "assistant", "content": (m.get("content") or "") + text})
        elif m["role"] == "tool":
            out.append({"role": "tool", "content": m.get("content") or ""})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    text = system_text(tools)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out, None


def _template_knows_tools(tokenizer: Any, tools: list[dict[str, Any]]) -> bool:
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = [{"role": "user", "content": "x"}]
    try:
        with_tools = tokenizer.apply_chat_template(probe, tools=tools, tokenize=False)
        without = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:
        return False
    return with_tools != without


def call_schema(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """JSON schema of one call: of the named function, or of any of the tools. The arguments
    are the function's declared parameters only (`additionalProperties: false` unless the
    schema says otherwise): a forced call never invents arguments, and a small model cannot
    run on adding keys until max_tokens."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": _declared_only(t["function"].get("parameters")),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
        if name is None or t["function"]["name"] == name
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _declared_only(params: dict[str, Any] | None) -> dict[str, Any]:
    if not params:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    if params.get("type") == "object" and "properties" in params:
        return {"additionalProperties": False, **params}
    return params


def split_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]] | None]:
    """(content, tool calls): the whole text and None when it holds no call; "" and the calls
    for a bare call; the text before the first `<tool_call>` block and the calls for blocks."""
    at = text.find(_TAG)
    head, tail = (text[:at], text[at:]) if at > 0 else ("", text)
    calls = parse_calls(tail, tools)
    return (head.strip(), calls) if calls else (text, None)


class CallStream:
    """One streamed choice under tools (module doc): `feed` each text delta, get back the
    content to send now and, once the choice has ended, its tool calls (or None)."""

    def __init__(self, tools: list[dict[str, Any]], forced: bool):
        self.tools = tools
        self.held = ""  # text not sent yet
        self.call_started = forced  # held text begins a call (or is forced to): hold to the end
        self.sent_any = False  # a bare JSON call must be the whole answer

    def feed(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]] | None]:
        self.held += text
        if finished:  # the same split as a whole reply's (`split_calls`)
            held, self.held = self.held, ""
            if self.sent_any and _TAG not in held:
                return held, None  # a bare call must be the whole answer
            return split_calls(held, self.tools)
        if self.call_started:
            return "", None
        stripped = self.held.lstrip()
        if not stripped:
            return "", None
        if stripped[0] in "{[" and not self.sent_any:
            self.call_started = True  # may be a bare call
            return "", None
        at = self.held.find(_TAG)
        if at >= 0:  # a block begins: what comes before it is content
            send, self.held, self.call_started = self.held[:at], self.held[at:], True
        else:
            keep = _partial_tag(self.held)  # a "<tool" at the end may still become a block
            cut = len(self.held) - keep
            send, self.held = self.held[:cut], self.held[cut:]
        self.sent_any = self.sent_any or bool(send)
        return send, None


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `<tool_call>`."""
    for n in range(min(len(_TAG) - 1, len(text)), 0, -1):
        if _TAG.startswith(text[-n:]):
            return n
    return 0


def parse_calls(text: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """OpenAI `tool_calls` if `text` is one or more calls of known functions, else None."""
    names = {t["function"]["name"] for t in tools}
    blocks = _TOOL_CALL_BLOCK.findall(text)
    candidates: list[Any] = []
    try:
        if blocks:
            candidates = [json.loads(b) for b in blocks]
        else:
            value = json.loads(text.strip())
            candidates = value if isinstance(value, list) else [value]
    except (json.JSONDecodeError, ValueError):
        return None
    calls = []
    for c in candidates:
        if not (isinstance(c, dict) and c.get("name") in names):
            return None
        args = c.get("arguments", c.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append({
            "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(args, ensure_ascii=False)},
        })  # fmt: skip
    return calls or None


def check_tools(body: Any) -> None:
    """400s for a tool_choice that cannot be served."""
    name = named_choice(body)
    if (body.tool_choice == "required" or name is not None) and not body.tools:
        raise APIError("tool_choice needs tools", param="tool_choice")
    if name is not None and name not in {t.function.name for t in body.tools}:
        raise APIError(f"tool_choice names an unknown function {name!r}", param="tool_choice")
    if tools_active(body) and (body.response_format or {}).get("type", "text") != "text":
        raise APIError("give tools or response_format, not both", param="response_format")
