"""The chat page in headless Chromium against a live server (tiny random model, agents `half`
and `reject`): streaming, multi-turn, compare mode, trace markers, stop, errors, layouts.

Screenshots land in artifacts/ui-screenshots/ (look at them after a UI change; the README's
copies live in docs/screenshots/).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from reliability.support import slow_engine

BASE = "tiny-llama"
SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "artifacts" / "ui-screenshots"
DONE = "article.answer.done, article.answer.failed, article.answer.stopped"


def set_max_tokens(page: Any, n: int) -> None:
    page.get_by_text("Options", exact=True).click()
    page.get_by_label("Max tokens", exact=True).fill(str(n))
    page.get_by_text("Options", exact=True).click()


def send(page: Any, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")


def wait_answers(page: Any, n: int) -> list[Any]:
    page.wait_for_function(
        f"() => document.querySelectorAll('{DONE}').length >= {n}", timeout=30_000
    )
    return page.locator("article.answer").all()


def test_reply_streams_in_and_conversation_continues(page: Any, ui_server: Any) -> None:
    page.get_by_label("Model", exact=True).select_option("half")
    set_max_tokens(page, 48)
    # Record the answer's length at every DOM change: streamed text arrives in pieces.
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const t = document.querySelector('article.answer .text');
            if (t) window.lengths.push(t.textContent.length);
        }).observe(document.getElementById('log'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    send(page, "Hello there")
    (answer,) = wait_answers(page, 1)
    assert "done" in answer.get_attribute("class")
    first = answer.locator(".text").text_content()
    assert first
    lengths = page.evaluate("window.lengths")
    assert len({n for n in lengths if 0 < n < len(first)}) >= 2, lengths
    assert "48 tokens" in answer.locator(".status").text_content()
    assert answer.locator(".text").get_attribute("aria-live") == "polite"
    assert answer.locator(".text").get_attribute("aria-busy") == "false"

    with page.expect_request("**/v1/chat/completions") as req:
        send(page, "And then?")
    body = json.loads(req.value.post_data)
    assert req.value.headers["authorization"] == f"Bearer {ui_server.api_key}"
    assert body["stream"] is True and body["model"] == "half" and body["mara_trace"] is True
    assert body["messages"] == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    wait_answers(page, 2)
    assert page.locator(".msg.user").all_text_contents() == ["Hello there", "And then?"]

    page.get_by_role("button", name="New chat").click()
    assert page.locator("article.answer").count() == 0
    with page.expect_request("**/v1/chat/completions") as req:
        send(page, "Fresh start")
    assert json.loads(req.value.post_data)["messages"] == [
        {"role": "user", "content": "Fresh start"}
    ]
    wait_answers(page, 1)


def test_compare_streams_base_and_agent_side_by_side(page: Any) -> None:
    page.get_by_label("Model", exact=True).select_option("half")
    page.get_by_label("Compare with base", exact=True).check()
    set_max_tokens(page, 32)
    events: list[str] = []
    page.on("request", lambda r: events.append("start") if "/chat/" in r.url else None)
    page.on("requestfinished", lambda r: events.append("end") if "/chat/" in r.url else None)
    send(page, "Compare these")
    base, agent = wait_answers(page, 2)
    assert events[:2] == ["start", "start"], "both streams run concurrently"
    assert base.locator(".who").text_content() == BASE
    assert agent.locator(".who").text_content() == "half"
    assert base.locator(".text").text_content() and agent.locator(".text").text_content()
    assert base.locator(".tok").count() == 0, "the base model makes no decisions"
    left, right = base.bounding_box(), agent.bounding_box()
    assert left["x"] + left["width"] <= right["x"] and abs(left["y"] - right["y"]) < 2


def test_trace_marks_rejected_and_fallback_tokens(page: Any) -> None:
    page.get_by_label("Model", exact=True).select_option("reject")
    set_max_tokens(page, 16)
    send(page, "Anything")
    (answer,) = wait_answers(page, 1)
    marks = answer.locator(".tok.fallback")
    assert marks.count() >= 8, "the reject-all agent falls back on (nearly) every token"
    marks.first.hover()
    tip = page.locator("#tip")
    tip.wait_for(state="visible")
    judged = re.search(r"all (\d+) judged candidates rejected; kept the model's top-1",
                       tip.text_content())  # fmt: skip
    assert judged, tip.text_content()
    n = int(judged[1])
    assert f"Rejected ({n})" in tip.text_content()
    assert n <= 8 or f"… {n - 8} more" in tip.text_content()
    assert "fallbacks" in answer.locator(".status").text_content()

    page.get_by_label("Model", exact=True).select_option("half")
    set_max_tokens(page, 48)
    send(page, "Again")
    answer = wait_answers(page, 2)[1]
    marks = answer.locator(".tok.rejected")
    assert marks.count() >= 3, "the half agent rejects candidates often"
    page.mouse.move(0, 0)
    marks.first.focus()  # keyboard: the first mark is in the tab order (roving tabindex)
    assert marks.first.get_attribute("tabindex") == "0"
    tip.wait_for(state="visible")
    text = tip.text_content()
    accepted = re.search(r"accepted #(\d+) of (\d+) candidates", text)
    assert accepted and 2 <= int(accepted[1]) <= int(accepted[2]), text
    assert "p(accept)" in text and f"Rejected ({int(accepted[1]) - 1})" in text
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement === document.querySelectorAll("
                         "'article.answer')[1].querySelectorAll('.tok')[1]")  # fmt: skip
    page.keyboard.press("Escape")
    assert tip.is_hidden()


def test_stop_aborts_the_stream_and_frees_the_slot(page: Any, ui_server: Any) -> None:
    page.get_by_label("Model", exact=True).select_option(BASE)
    # 3000 tokens at >= 10 ms a step (however fast the machine decodes the tiny model): only
    # Stop ends the stream within the test
    with slow_engine(ui_server, step_s=0.01):
        set_max_tokens(page, 3000)
        send(page, "Go on forever")
        page.wait_for_function(
            "() => (document.querySelector('article.answer .text')?.textContent.length || 0) > 40"
        )
        assert ui_server.metric("mara_num_requests_running") >= 1
        page.get_by_role("button", name="Stop").click()
        deadline = time.monotonic() + 2
        while ui_server.metric("mara_num_requests_running") > 0:
            assert time.monotonic() < deadline, "the server still runs the stopped request"
            time.sleep(0.05)
    (answer,) = wait_answers(page, 1)
    assert "stopped" in answer.get_attribute("class")
    assert "stopped" in answer.locator(".status").text_content()
    assert page.get_by_role("button", name="Send").is_visible()


def test_bad_api_key_shows_the_servers_error(page: Any) -> None:
    page.get_by_label("API key", exact=True).fill("not-the-key")
    page.get_by_label("API key", exact=True).press("Tab")
    notice = page.locator("#notice")
    notice.wait_for(state="visible")
    assert "incorrect API key provided" in notice.text_content()
    send(page, "Hi")
    (answer,) = wait_answers(page, 1)
    assert answer.get_by_role("alert").text_content() == "incorrect API key provided"


def test_request_error_from_the_server_is_shown(page: Any) -> None:
    page.get_by_label("Model", exact=True).select_option(BASE)
    set_max_tokens(page, 100_000)
    send(page, "Hi")
    (answer,) = wait_answers(page, 1)
    error = answer.get_by_role("alert").text_content()
    assert "context" in error and "4096" in error, error


def test_in_band_stream_error_is_shown_after_partial_text(page: Any) -> None:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "half"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**chunk, "choices": [{"index": 0, "delta": {"content": "Partial answer"}}]},
        {"error": {"message": "generation failed: engine error", "type": "server_error",
                   "param": None, "code": "generation_failed"}},
    ]  # fmt: skip
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
    )
    send(page, "Hi")
    (answer,) = wait_answers(page, 1)
    assert answer.locator(".text").text_content() == "Partial answer"
    assert answer.get_by_role("alert").text_content() == "generation failed: engine error"


def test_controls_are_labelled_and_keyboard_reachable(page: Any) -> None:
    unnamed = page.evaluate("""() =>
        [...document.querySelectorAll('input, select, textarea, button')]
        .filter(el => !(el.labels?.length || el.ariaLabel || el.textContent.trim()))
        .map(el => el.id)""")
    assert unnamed == []
    page.get_by_label("Message", exact=True).focus()
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "prompt"


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("device", ["desktop", "phone"])
def test_layouts_fit_and_screenshots(open_chat: Any, device: str, scheme: str) -> None:
    if device == "phone":
        page = open_chat(width=390, height=844, scheme=scheme, scale=2)
    else:
        page = open_chat(width=1280, height=800, scheme=scheme)
    page.get_by_label("Model", exact=True).select_option("half")
    page.get_by_label("Compare with base", exact=True).check()
    set_max_tokens(page, 40)
    send(page, "Tell me about the sea.")
    wait_answers(page, 2)
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the {device} layout scrolls sideways"
    page.locator("article.answer.agent .tok").first.hover()
    page.locator("#tip").wait_for(state="visible")
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / f"chat-{device}-{scheme}.png"))
