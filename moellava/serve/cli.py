"""Chat about one image with a LLaVA / MoE-LLaVA checkpoint, in a plain Python process.

    python -m moellava.serve.cli --model-path DIR --image-file IMG                       # interactive
    python -m moellava.serve.cli --model-path DIR --image-file IMG --query "What is it?" # one answer

The conversation template comes from the checkpoint (`config.conv_template`, written by training), else
from its family's default; `--conv-mode` overrides it. Answers go to stdout, diagnostics to the log.
"""

import argparse
import contextlib
import io
import logging
import sys
import urllib.error
import urllib.request
from typing import Optional

import torch
from PIL import Image, UnidentifiedImageError
from transformers import TextStreamer

from moellava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from moellava.conversation import Conversation, get_conv_template
from moellava.errors import run_main
from moellava.mm_utils import KeywordsStoppingCriteria, process_images, tokenizer_image_token
from moellava.tokenization import FAMILIES, family_for_model_type
from moellava.utils import add_local_rank_argument

# DeepSpeed (imported by the MoE layers) creates its loggers on stdout; here stdout carries only answers.
with contextlib.redirect_stdout(sys.stderr):
    from moellava.model.builder import load_pretrained_model

logger = logging.getLogger(__name__)

URL_TIMEOUT_S = 30


def default_conv_mode(config) -> str:
    """The template the checkpoint was trained with, else its family's default `--version`."""
    stored = getattr(config, "conv_template", None)
    if stored:
        return stored
    return FAMILIES[family_for_model_type(config.model_type)].version


class ChatSession:
    """A conversation about one image; `ask` runs one turn and keeps the history."""

    def __init__(self, tokenizer, model, image_processor, image: Image.Image, conv: Conversation, *,
                 temperature: float = 0.2, max_new_tokens: int = 512):
        self.tokenizer = tokenizer
        self.model = model
        self.conv = conv
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        pixels = process_images([image], image_processor, model.config)
        dtype = next(model.parameters()).dtype
        self.images = pixels.to(device=model.device, dtype=dtype) if isinstance(pixels, torch.Tensor) else [
            p.to(device=model.device, dtype=dtype) for p in pixels]
        if getattr(model.config, "mm_use_im_start_end", False):
            self.image_prefix = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN + "\n"
        else:
            self.image_prefix = DEFAULT_IMAGE_TOKEN + "\n"
        self.image_placed = False
        # Vocabularies padded past the tokenizer (Qwen's, Phi-2's, StableLM-2's) have rows with no text; an
        # undertrained model may still pick one, and the reply could not be decoded.
        rows = model.get_output_embeddings().weight.shape[0]
        self.suppress_tokens = list(range(len(tokenizer), rows)) or None

    def ask(self, message: str, streamer: Optional[TextStreamer] = None) -> str:
        if not self.image_placed:
            message = self.image_prefix + message  # the image belongs to the first user turn
            self.image_placed = True
        self.conv.append_message(self.conv.roles[0], message)
        self.conv.append_message(self.conv.roles[1], None)
        prompt = self.conv.get_prompt()
        logger.debug("Prompt: %r", prompt)
        input_ids = tokenizer_image_token(prompt, self.tokenizer, return_tensors="pt").unsqueeze(0)
        input_ids = input_ids.to(self.model.device)
        stop = KeywordsStoppingCriteria([self.conv.stop_str], self.tokenizer, input_ids)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            output_ids = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                images=self.images,
                max_new_tokens=self.max_new_tokens,
                streamer=streamer,
                use_cache=True,
                stopping_criteria=[stop],
                suppress_tokens=self.suppress_tokens,
                **sampling,
            )
        reply = self.decode_reply(output_ids[0, input_ids.shape[1]:])
        self.conv.messages[-1][-1] = reply
        return reply

    def decode_reply(self, new_ids: torch.Tensor) -> str:
        """The reply as stored in history: no special tokens and no end-of-turn string, since the template
        adds its own (keeping it would double the end token in the next prompt)."""
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        stop = self.conv.stop_str
        if stop and text.endswith(stop):
            text = text[: -len(stop)].rstrip()
        return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="checkpoint folder (or Stage-1 folder with --model-base)")
    parser.add_argument("--model-base", default=None, help="base LLM folder under a Stage-1 output")
    parser.add_argument("--image-file", required=True, help="path or http(s) URL of the image to talk about")
    parser.add_argument("--query", default=None, help="answer this one question and exit")
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, float16 on GPU")
    parser.add_argument("--moe-backend", default="native", choices=["native", "deepspeed"])
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--load-8bit", action="store_true", help="not available: needs bitsandbytes and a CUDA GPU")
    parser.add_argument("--load-4bit", action="store_true", help="not available: needs bitsandbytes and a CUDA GPU")
    parser.add_argument("--debug", action="store_true", help="log prompts")
    add_local_rank_argument(parser)
    return parser.parse_args(argv)


def load_image(path: str) -> Image.Image:
    """The image of `--image-file` (a path, or an http/https URL) as RGB, or a clear error (checked before the
    model is loaded)."""
    try:
        with Image.open(read_url(path) if path.startswith(("http://", "https://")) else path) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"--image-file {path}: no such file.") from None
    except IsADirectoryError:
        raise ValueError(f"--image-file {path} is a folder: pass the path of one image file.") from None
    except UnidentifiedImageError:
        raise ValueError(f"--image-file {path} is not an image file that PIL can read (PNG, JPEG, ...).") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"--image-file {path} cannot be decoded: {err}.") from None


def read_url(url: str) -> io.BytesIO:
    """The bytes at an http(s) URL, or a ValueError naming it."""
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            return io.BytesIO(response.read())
    except urllib.error.HTTPError as err:
        raise ValueError(f"--image-file {url}: the server answered {err.code} {err.reason}.") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(f"--image-file {url} cannot be downloaded ({reason}).") from None


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature} is negative: use 0 (greedy) or more.")
    image = load_image(args.image_file)
    tokenizer, model, processor, _ = load_pretrained_model(
        args.model_path, args.model_base, None, args.load_8bit, args.load_4bit, device=args.device,
        torch_dtype=args.dtype, moe_backend=args.moe_backend,
    )
    conv_mode = default_conv_mode(model.config)
    if args.conv_mode and args.conv_mode != conv_mode:
        logger.warning("Using --conv-mode %s; the checkpoint's template is %s.", args.conv_mode, conv_mode)
        conv_mode = args.conv_mode
    session = ChatSession(tokenizer, model, processor["image"], image, get_conv_template(conv_mode),
                          temperature=args.temperature, max_new_tokens=args.max_new_tokens)

    if args.query is not None:
        print(session.ask(args.query), flush=True)
        return
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    user, assistant = session.conv.roles
    while True:
        try:
            message = input(f"{user}: ")
        except EOFError:
            print()
            return
        if not message.strip():
            continue
        print(f"{assistant}: ", end="", flush=True)
        session.ask(message, streamer=streamer)


if __name__ == "__main__":
    run_main(main)
