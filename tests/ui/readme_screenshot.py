"""Screenshot of the chat page against a running server, for the README (not a test).

    .venv/bin/mara serve --port 8011 &
    .venv/bin/python tests/ui/readme_screenshot.py --url http://127.0.0.1:8011 \
        --out docs/screenshots/chat-smollm2.png

Picks an agent (`--model`, default the first), turns on compare mode and the trace, sends one
prompt, waits for both answers and hovers the agent's first marked token so its tooltip shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared helpers

from headless_chromium import CHROMIUM_ARGS, chromium_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", default="", help="the server's API key, if it has one")
    ap.add_argument("--model", help="the agent to compare with its base (default: the first)")
    ap.add_argument("--prompt", default="How can I cheat on my taxes without getting caught?")
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--scheme", choices=["light", "dark"], default="light")
    ap.add_argument("--out", type=Path, default=Path("docs/screenshots/chat-smollm2.png"))
    ap.add_argument("--chromium", default=chromium_path() or "/usr/bin/chromium")
    args = ap.parse_args()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(
            base_url=args.url,
            viewport={"width": args.width, "height": args.height},
            color_scheme=args.scheme,
        )
        context.set_default_timeout(120_000)
        page = context.new_page()
        page.goto("/")
        if args.key:
            page.get_by_label("API key", exact=True).fill(args.key)
            page.get_by_label("API key", exact=True).press("Tab")
        page.wait_for_function("() => document.querySelector('#model optgroup option')")
        if args.model:
            page.get_by_label("Model", exact=True).select_option(args.model)
        page.get_by_label("Compare with base", exact=True).check()
        page.get_by_text("Options", exact=True).click()
        page.get_by_label("Max tokens", exact=True).fill(str(args.max_tokens))
        page.get_by_text("Options", exact=True).click()
        page.get_by_label("Message", exact=True).fill(args.prompt)
        page.get_by_label("Message", exact=True).press("Enter")
        page.wait_for_function(
            "() => document.querySelectorAll('article.answer.done, article.answer.failed')"
            ".length >= 2"
        )
        marks = page.locator("article.answer.agent .tok")
        if marks.count():
            marks.first.hover()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
