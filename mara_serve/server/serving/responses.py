"""/v1/responses: a Responses request → one chat completion (protocol/responses.py) → a
`response` object, or its SSE events.

Stream (OpenAI's event sequence, each `event: TYPE` + `data: {...}` with a `sequence_number`):
`response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta`…, `response.output_text.done`,
`response.content_part.done`, `response.output_item.done`, `response.completed`. With tools,
text that may still become a call is held to the end (tools.CallStream) and sent as
`function_call` items; other text streams as the message's deltas. An error after the stream
began is an `error` event.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.responses import Response

from mara_serve.server.errors import APIError, describe
from mara_serve.server.protocol.chat import ChatCompletionRequest
from mara_serve.server.protocol.responses import ResponseObject, ResponsesRequest, ResponseUsage
from mara_serve.server.serving import tools
from mara_serve.server.serving.chat import ChatServing
from mara_serve.server.serving.generation import Generation
from mara_serve.server.serving.transport import sse_event


class ResponsesServing:
    def __init__(self, chat: ChatServing):
        self.chat = chat

    async def create(self, body: ResponsesRequest, raw: Request) -> Response:
        try:
            chat_body = ChatCompletionRequest.model_validate(body.to_chat())
        except ValidationError as e:
            err = e.errors()[0]
            raise APIError(err["msg"], param=".".join(str(x) for x in err["loc"])) from None
        gen = await self.chat.start(chat_body)
        rid = "resp_" + gen.request_id.rsplit("-", 1)[-1]
        return await self.chat.respond(
            raw, gen, body.stream,
            lambda results, created: self._response(
                rid, body, chat_body, gen, created, results[0].text, results[0].finish_reason
            ),
            lambda created: self._events(rid, body, chat_body, gen, created),
        )  # fmt: skip

    def _response(
        self, rid: str, body: ResponsesRequest, chat: ChatCompletionRequest, gen: Generation,
        created: int, text: str | None, finish: str | None, status: str = "completed",
        calls: list[dict[str, Any]] | None = None,
    ) -> ResponseObject:  # fmt: skip
        """`text`: the reply (None: not yet). `calls`: its tool calls when already split from
        the text (streaming); else they are parsed from `text` here."""
        output: list[dict[str, Any]] = []
        if text is not None:
            if calls is None and tools.tools_active(chat):
                text, calls = tools.split_calls(text, chat.tool_specs)
            output = [message(rid, text)] if text or not calls else []
            output += [function_call(c) for c in calls or []]
        incomplete = finish == "length" and status == "completed"
        usage = gen.usage()
        return ResponseObject(
            id=rid, created_at=created, model=body.model, output=output,
            status="incomplete" if incomplete else status,
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            usage=ResponseUsage(input_tokens=usage["prompt_tokens"],
                                output_tokens=usage["completion_tokens"],
                                total_tokens=usage["total_tokens"]) if text is not None else None,
            instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            temperature=body.temperature, top_p=body.top_p, tools=body.tools or [],
            tool_choice=body.tool_choice or "auto", text=body.text or {"format": {"type": "text"}},
            metadata=body.metadata or {}, parallel_tool_calls=body.parallel_tool_calls is not False,
        )  # fmt: skip

    async def _events(
        self, rid: str, body: ResponsesRequest, chat: ChatCompletionRequest, gen: Generation,
        created: int,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        seq = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal seq
            payload = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return f"event: {kind}\n".encode() + sse_event(payload)

        def snapshot(status: str, text: str | None = None, finish: str | None = None) -> dict:
            return self._response(rid, body, chat, gen, created, text, finish,
                                  status).model_dump(mode="json")  # fmt: skip

        held = (tools.CallStream(chat.tool_specs, tools.call_forced(chat))
                if tools.tools_active(chat) else None)  # fmt: skip
        item_id = "msg_" + rid.removeprefix("resp_")
        parts: list[str] = []
        finish, calls, opened = None, None, False
        try:
            yield event("response.created", response=snapshot("in_progress"))
            yield event("response.in_progress", response=snapshot("in_progress"))
            if held is None:  # no call possible: the message item opens at once
                yield from_open(event, item_id)
                opened = True
            async for d in gen.deltas():
                text = d.text
                if held is not None:
                    text, found = held.feed(d.text, d.finish_reason is not None)
                    calls = found or calls
                if text:
                    if not opened:
                        yield from_open(event, item_id)
                        opened = True
                    parts.append(text)
                    yield event("response.output_text.delta", item_id=item_id, output_index=0,
                                content_index=0, delta=text, logprobs=[])  # fmt: skip
                if d.finish_reason is not None:
                    finish = d.finish_reason
            gen.mark("success")
            text = "".join(parts)
            final = self._response(rid, body, chat, gen, created, text, finish, "completed",
                                   calls or []).model_dump(mode="json")  # fmt: skip
            items = final["output"]
            if items and items[0]["type"] == "message":
                if not opened:  # an empty reply
                    yield from_open(event, item_id)
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                yield event("response.output_text.done", item_id=item_id, output_index=0,
                            content_index=0, text=text, logprobs=[])  # fmt: skip
                yield event("response.content_part.done", item_id=item_id, output_index=0,
                            content_index=0, part=part)  # fmt: skip
                yield event("response.output_item.done", output_index=0, item=items[0])
            for i, item in enumerate(items):
                if item["type"] == "function_call":
                    yield event("response.output_item.added", output_index=i,
                                item={**item, "status": "in_progress"})  # fmt: skip
                    yield event("response.output_item.done", output_index=i, item=item)
            kind = "response.completed" if final["status"] == "completed" else (
                "response.incomplete"
            )  # fmt: skip
            yield event(kind, response=final)
        except Exception as e:  # the 200 went out already: an in-band error event
            gen.mark_failed(e)
            err = describe(e).body()["error"]
            yield event("error", code=err["code"] or err["type"], message=err["message"],
                        param=err["param"])  # fmt: skip
        finally:
            await gen.aclose()


def from_open(event, item_id: str) -> bytes:
    """The opening events of the text item (one chunk of bytes)."""
    item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant",
            "content": []}  # fmt: skip
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    return event("response.output_item.added", output_index=0, item=item) + event(
        "response.content_part.added",
        item_id=item_id,
        output_index=0,
        content_index=0,
        part=part,
    )


def message(rid: str, text: str) -> dict[str, Any]:
    return {
        "type": "message", "id": "msg_" + rid.removeprefix("resp_"), "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }  # fmt: skip


def function_call(call: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function_call", "id": "fc_" + uuid.uuid4().hex, "call_id": call["id"],
        "name": call["function"]["name"], "arguments": call["function"]["arguments"],
        "status": "completed",
    }  # fmt: skip
