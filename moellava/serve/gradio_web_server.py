"""A web demo of a LLaVA / MoE-LLaVA checkpoint (Gradio), on CPU or a GPU, with no `deepspeed` launcher.

    python -m moellava.serve.gradio_web_server --model-path DIR [--host 127.0.0.1 --port 7860 --share False]

Attach one or more images to a question and chat over several turns; each answer streams in as it is
generated. Regenerate, Clear, temperature / top-p / max-new-tokens controls and examples. The template
(`--conv-mode` overrides it) and the MoE layers come from the checkpoint; answers come from the CLI's
generation code (`moellava.serve.cli`), so greedy answers equal the CLI's. The original's
`--local_rank` (passed by the `deepspeed` launcher) is accepted and unused.

Uploads are checked before they reach the model (an image format, at most --max-upload-mb, decodable);
a bad one is reported in the page. Gradio's files (uploads, the example images) live in one temporary
folder, removed when the server stops (Ctrl-C or SIGTERM). The page is in `moellava.serve.chat_page`.
"""

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import tempfile
import warnings

from moellava.errors import run_main
from moellava.serve.cli import add_model_arguments, load_chat_model

logger = logging.getLogger(__name__)


def str2bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", type=str2bool, nargs="?", const=True, default=False,
                        help="also serve through a public gradio.live link (needs internet)")
    parser.add_argument("--temperature", type=float, default=0.2, help="the slider's start value; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="the slider's start value")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="the slider's start value")
    parser.add_argument("--max-upload-mb", type=float, default=20, help="largest image file accepted")
    parser.add_argument("--render-markdown", type=str2bool, default=True,
                        help="show answers as Markdown (False: the text exactly as generated)")
    return parser.parse_args(argv)


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # launch() closes the server on Ctrl-C; SIGTERM does the same


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if importlib.util.find_spec("gradio") is None:
        raise ValueError("The web demo needs Gradio: pip install -e '.[serve]' (`make install` does).")
    tokenizer, model, image_processor, conv_mode = load_chat_model(args)
    workdir = tempfile.mkdtemp(prefix="moellava-web-")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        # Gradio fixes its temporary folder when it is imported: set it, then import the page.
        os.environ["GRADIO_TEMP_DIR"] = os.path.join(workdir, "gradio")
        from moellava.serve import chat_page

        # Gradio 6.17 reads a status constant that Starlette 1.x renamed, which warns on every request.
        warnings.filterwarnings("ignore", message="'HTTP_422_UNPROCESSABLE_ENTITY' is deprecated")
        examples_dir = os.path.join(workdir, "examples")
        examples = chat_page.write_examples(examples_dir)
        max_bytes = int(args.max_upload_mb * 2**20)
        chat = chat_page.WebChat(tokenizer, model, image_processor, conv_mode, max_bytes)
        description = chat_page.describe_model(args.model_path, model, conv_mode)
        demo = chat_page.build_demo(chat, "MoE-LLaVA", description, examples, temperature=args.temperature,
                                    top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                    render_markdown=args.render_markdown)
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                    max_file_size=max_bytes, allowed_paths=[examples_dir], ssr_mode=False, theme=chat_page.THEME)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
