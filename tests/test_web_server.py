"""The web demo (moellava.serve.gradio_web_server): upload checks, flags, streaming and regenerate at the
handler level, and an end-to-end run of the server driven by a real headless Chromium (Playwright):
uploads, two streamed turns equal to the CLI's greedy answers, visible errors for bad uploads, no request
leaving the machine, and nothing left on disk after the server stops."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the web demo needs the serve extra: pip install -e '.[serve]'")

from moellava.conversation import get_conv_template  # noqa: E402
from moellava.demo.run import free_port  # noqa: E402
from moellava.model.builder import load_pretrained_model  # noqa: E402
from moellava.serve import chat_page  # noqa: E402
from moellava.serve import gradio_web_server  # noqa: E402
from moellava.serve.cli import ChatSession  # noqa: E402
from moellava.tokenization import load_tokenizer  # noqa: E402

import tiny_llava  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW_TOKENS = 24
TURNS = (("What is in the image?", "A small red cat is sitting on the table."),
         ("And what colour is it?", "It is red and white."))
QUESTIONS = tuple(question for question, _ in TURNS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny MoE-LLaVA that learned one two-turn conversation, so its answers are words (streamed word by
    word) ending with the template's end token."""
    root = tmp_path_factory.mktemp("web")
    tokenizer_dir = tiny_llava.build_tiny_llama_tokenizer(root / "tokenizer")
    tower = tiny_llava.build_tiny_clip_tower(root / "clip")
    image = tiny_llava.write_test_image(root / "photo.png")
    model = tiny_llava.upcycle_llava_llama(tiny_llava.tiny_llava_llama(tokenizer_dir, tower), num_experts=4)
    tiny_llava.perturb_experts(model)
    tokenizer = load_tokenizer(tokenizer_dir)
    tiny_llava.fit_to_conversation(model, tokenizer, model.get_image_tower().image_processor, image, TURNS)
    model.save_pretrained(root / "moe", safe_serialization=True)
    tokenizer.save_pretrained(root / "moe")
    return {"root": root, "model": str(root / "moe"), "image": image}


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_pretrained_model(checkpoint["model"])


def greedy_session(loaded, image):
    tokenizer, model, processor, _ = loaded
    return ChatSession(tokenizer, model, processor["image"], image, get_conv_template("v1"), temperature=0,
                       max_new_tokens=MAX_NEW_TOKENS)


# ------------------------------------------------------------------------------------------- uploads


def test_good_uploads_load_as_rgb(tmp_path):
    Image.new("RGBA", (40, 30), (10, 20, 30, 128)).save(tmp_path / "a.png")
    Image.new("L", (20, 10), 7).save(tmp_path / "b.jpg")
    for name, size in (("a.png", (40, 30)), ("b.jpg", (20, 10))):
        image = chat_page.load_upload(str(tmp_path / name), max_bytes=2**20)
        assert image.mode == "RGB" and image.size == size


def test_bad_uploads_are_refused_with_the_reason(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (40, 30)).save(tmp_path / "raw.ppm")
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cases = [
        ("notes.png", {}, r"notes.png is not a readable image \(its format is not recognised\)"),
        ("raw.ppm", {}, r"raw.ppm is a PPM file, not an image format the demo takes \(PNG, JPEG"),
        ("cut.png", {}, r"cut.png is not a readable image \(.*truncated"),
        ("whole.png", {"max_bytes": 100}, r"whole.png is 0.0 MB; images up to 9.53674e-05 MB are accepted"),
        ("whole.png", {"max_pixels": 4000}, r"whole.png has 64x64 pixels; at most 4,000 are accepted"),
    ]
    for name, limits, message in cases:
        with pytest.raises(chat_page.UploadError, match=message):
            chat_page.load_upload(str(tmp_path / name), **{"max_bytes": 2**20, **limits})


# --------------------------------------------------------------------------------------------- flags


def test_original_flags_and_share_values():
    args = gradio_web_server.parse_args(["--model-path", "ckpt", "--local_rank", "0"])
    assert (args.model_path, args.local_rank, args.host, args.port, args.share) == ("ckpt", 0, "127.0.0.1", 7860, False)
    assert gradio_web_server.parse_args(["--model-path", "c", "--share"]).share is True
    assert gradio_web_server.parse_args(["--model-path", "c", "--share", "False"]).share is False
    with pytest.raises(SystemExit):
        gradio_web_server.parse_args(["--model-path", "c", "--share", "maybe"])


# ------------------------------------------------------------------------------------------ handlers


def test_streamed_reply_grows_to_the_cli_reply_and_regenerates(loaded, checkpoint):
    image = Image.open(checkpoint["image"]).convert("RGB")
    expected = greedy_session(loaded, image).ask(QUESTIONS[0])

    session = greedy_session(loaded, image)
    session.add_user_turn(QUESTIONS[0])
    states = list(session.stream_reply())
    assert len(states) > 2 and states[-1] == expected
    assert all(expected.startswith(state.strip()) for state in states)
    assert session.conv.messages[-1] == ["ASSISTANT", expected]

    tokenizer, model, processor, _ = loaded
    chat = chat_page.WebChat(tokenizer, model, processor["image"], "v1", max_upload_bytes=2**20)
    history, session, box = chat.add_turn({"text": QUESTIONS[0], "files": [checkpoint["image"]]}, [], None)
    assert box is None and [m["role"] for m in history] == ["user", "user", "assistant"]
    *_, history = chat.stream(history, session, 0, 1.0, MAX_NEW_TOKENS)
    assert history[-1] == {"role": "assistant", "content": expected}
    history = chat.regenerate(history, session)
    assert history[-1]["content"] == "" and session.conv.messages[-1][1] is None
    *_, history = chat.stream(history, session, 0, 1.0, MAX_NEW_TOKENS)
    assert history[-1]["content"] == expected and len(session.conv.messages) == 2
    assert chat.clear() == ([], None, None)


def test_a_refused_turn_changes_nothing_and_says_why(loaded, tmp_path):
    tokenizer, model, processor, _ = loaded
    chat = chat_page.WebChat(tokenizer, model, processor["image"], "v1", max_upload_bytes=2**20)
    bad = tmp_path / "<b>bad<i>.png"
    bad.write_text("not an image")
    with pytest.warns(UserWarning, match="&lt;b&gt;bad&lt;i&gt;.png is not a readable image"):
        outputs = chat.add_turn({"text": "What is it?", "files": [str(bad)]}, [], None)
    assert outputs == (gr.skip(),) * 3
    with pytest.warns(UserWarning, match="Type a question"):
        assert chat.add_turn({"text": " ", "files": []}, [], None) == (gr.skip(),) * 3
    with pytest.warns(UserWarning, match="no reply to regenerate"):
        assert chat.regenerate([], None) == gr.skip()
    assert list(chat.stream([], None, 0, 1.0, MAX_NEW_TOKENS)) == [gr.skip()]  # the chat stays as it was

    history, session, _ = chat.add_turn({"text": "What is it?", "files": []}, [], None)
    with pytest.warns(UserWarning, match="The last question has no answer yet"):
        assert chat.add_turn({"text": "And now?", "files": []}, history, session) == (gr.skip(),) * 3


# ------------------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def chromium():
    """The Chromium binary (skips the test, with the reason, when there is none); first of the test's
    fixtures, so a skip costs no checkpoint."""
    for name in (os.environ.get("MOELLAVA_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = name and shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium browser found (Debian: apt-get install chromium; `make test` installs it as root); "
                "set MOELLAVA_CHROMIUM to a Chromium binary to use another one")


def wait_until_serving(process, url, log_path, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the server did not answer at {url} within {timeout} s:\n{open(log_path).read()[-3000:]}")


# Records every (number of answers, text of the last answer) the page shows, to see answers grow as they stream.
RECORD_ANSWERS = """() => {
    window.answerStates = [];
    const record = () => {
        const answers = document.querySelectorAll('#chatbot [data-testid="bot"]');
        if (!answers.length) return;
        const state = [answers.length, answers[answers.length - 1].textContent];
        const last = window.answerStates[window.answerStates.length - 1];
        if (!last || last[0] !== state[0] || last[1] !== state[1]) window.answerStates.push(state);
    };
    new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.mark.slow
def test_browser_chat_streams_the_cli_answers_and_shows_upload_errors(chromium, loaded, checkpoint, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Playwright (test extra)")
    first_session = greedy_session(loaded, Image.open(checkpoint["image"]).convert("RGB"))
    expected = [first_session.ask(question) for question in QUESTIONS]

    # The server's temporary folder, home and working directory are the test's own, to see what it leaves.
    dirs = {name: tmp_path / name for name in ("tmp", "home", "cwd")}
    for folder in dirs.values():
        folder.mkdir()
    env = dict(os.environ, TMPDIR=str(dirs["tmp"]), HOME=str(dirs["home"]), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "moellava.serve.gradio_web_server", "--model-path", checkpoint["model"],
               "--port", str(port), "--device", "cpu", "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS),
               "--render-markdown", "False", "--max-upload-mb", "1"]
    broken = tmp_path / "broken.png"
    broken.write_text("this is not an image")
    too_big = tmp_path / "too_big.png"
    Image.effect_noise((900, 900), 80).convert("RGB").save(too_big)
    assert too_big.stat().st_size > 2**20

    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=dirs["cwd"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(server, url, log_path)
        with sync_api.sync_playwright() as playwright:
            # Every host name but the server's fails to resolve: the page cannot reach the internet.
            browser = playwright.chromium.launch(
                executable_path=chromium, args=["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"])
            page = browser.new_page()
            elsewhere = []
            page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else elsewhere.append(r.url))
            page.goto(url)
            question = page.locator("#question textarea")
            upload = page.locator("#question input[type=file]")
            answers = page.locator('#chatbot [data-testid="bot"]')
            page.evaluate(RECORD_ANSWERS)

            upload.set_input_files(checkpoint["image"])
            sync_api.expect(page.locator("#question img")).to_have_count(1)  # the attachment's thumbnail
            question.fill(QUESTIONS[0])
            question.press("Enter")
            sync_api.expect(answers).to_have_count(1)
            sync_api.expect(answers.nth(0)).to_have_text(expected[0], timeout=60_000)
            sync_api.expect(page.locator('#chatbot [data-testid="user"] img')).to_have_count(1)
            first_states = page.evaluate("window.answerStates.splice(0)")

            question.fill(QUESTIONS[1])
            question.press("Enter")
            sync_api.expect(answers).to_have_count(2)
            sync_api.expect(answers.nth(1)).to_have_text(expected[1], timeout=60_000)
            second_states = page.evaluate("window.answerStates.splice(0)")

            upload.set_input_files(str(broken))
            question.fill("What is this?")
            question.press("Enter")
            sync_api.expect(page.get_by_text("broken.png is not a readable image")).to_be_visible()

            upload.set_input_files(str(too_big))
            # Gradio itself refuses files over --max-upload-mb before they reach the server's disk.
            sync_api.expect(page.get_by_text('exceed the maximum allowed size of 1.0 Mb: "too_big.png"')).to_be_visible()
            sync_api.expect(answers).to_have_count(2)  # the refused turns asked nothing
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    log = log_path.read_text()

    for turn, states in enumerate((first_states, second_states), start=1):
        shown = [text for count, text in states if count == turn]
        # The answer grew word by word (the streamer's pieces) to the CLI's answer.
        assert shown[-1] == expected[turn - 1] and all(expected[turn - 1].startswith(s.strip()) for s in shown), shown
        assert len({text.strip() for text in shown if text.strip()}) >= 3, shown
    assert elsewhere == []
    assert "Traceback" not in log, log[-3000:]
    assert server.returncode == 0, log[-3000:]
    # Only the libraries' own caches may appear in the home folder: transformers' Hugging Face cache (as for
    # the CLI) and matplotlib's font list (gradio imports matplotlib when the vis extra installed it).
    assert list(dirs["tmp"].iterdir()) == [] and list(dirs["cwd"].iterdir()) == []
    home_files = {path.relative_to(dirs["home"]).parts[:2] for path in dirs["home"].rglob("*") if path.is_file()}
    assert home_files <= {(".cache", "huggingface"), (".cache", "matplotlib")}, home_files
