"""Take docs/serve_demo.png: the web demo on the `make demo` checkpoint, in headless Chromium.

    make demo && .venv/bin/python tools/serve_screenshot.py [--model-path demo_output/stage3]

Starts `python -m moellava.serve.gradio_web_server` on a free local port, uploads a held-out image of the
demo's data, asks the colour and then the shape (greedy), uploads a file that is not an image so that the
refusal shows, and saves the page. Needs Chromium (Debian: apt-get install chromium) and Playwright.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from playwright.sync_api import expect, sync_playwright

from moellava.demo import data
from moellava.demo.run import free_port

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until_still(locator, seconds: float = 2.0) -> str:
    """The locator's text once it is non-empty and has not changed for `seconds` (the answer has streamed)."""
    text, since = None, time.time()
    while True:
        current = locator.text_content()
        if current != text:
            text, since = current, time.time()
        elif text and time.time() - since >= seconds:
            return text
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=os.path.join(REPO_DIR, "demo_output", "stage3"))
    parser.add_argument("--data-dir", default=os.path.join(REPO_DIR, "demo_output", "data"))
    parser.add_argument("--output", default=os.path.join(REPO_DIR, "docs", "serve_demo.png"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    with open(os.path.join(args.data_dir, "eval.json"), encoding="utf-8") as f:
        image = os.path.join(args.data_dir, "images", json.load(f)[0]["image"])

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, "-m", "moellava.serve.gradio_web_server", "--model-path",
                               args.model_path, "--port", str(port), "--temperature", "0", "--max-new-tokens", "16"])
    with tempfile.TemporaryDirectory() as scratch:
        not_an_image = os.path.join(scratch, "notes.png")
        with open(not_an_image, "w", encoding="utf-8") as f:
            f.write("a text file named like an image")
        try:
            while server.poll() is None:
                try:
                    urllib.request.urlopen(url, timeout=5).close()
                    break
                except OSError:
                    time.sleep(1)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=args.chromium, args=["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"])
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(url)
                question = page.locator("#question textarea")
                upload = page.locator("#question input[type=file]")
                answers = page.locator('#chatbot [data-testid="bot"]')
                upload.set_input_files(image)
                expect(page.locator("#question img")).to_have_count(1)
                for turn, text in enumerate((data.COLOUR_QUESTIONS[0], data.SHAPE_QUESTIONS[0]), start=1):
                    question.fill(text)
                    question.press("Enter")
                    expect(answers).to_have_count(turn)
                    wait_until_still(answers.nth(turn - 1))
                upload.set_input_files(not_an_image)
                question.fill("And this one?")
                question.press("Enter")
                expect(page.get_by_text("notes.png is not a readable image")).to_be_visible()
                page.wait_for_timeout(1500)  # the notice slides in; the refused turn's queue entry ends
                page.screenshot(path=args.output)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"Saved {args.output}")


if __name__ == "__main__":
    main()
