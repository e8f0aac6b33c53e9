"""Chat about images with a LLaVA / MoE-LLaVA checkpoint, in a plain Python process.

    python -m moellava.serve.cli --model-path DIR --image-file IMG                       # interactive
    python -m moellava.serve.cli --model-path DIR --image-file IMG --query "What is it?" # one answer

The conversation template comes from the checkpoint (`config.conv_template`, written by training), else
from its family's default; `--conv-mode` overrides it. Answers go to stdout, diagnostics to the log.

`ChatSession` and `generate_replies` are the one generation path of the CLI, the web demo
(`moellava.serve.gradio_web_server`) and the Python API (`moellava.predict`).
"""

import argparse
import contextlib
import io
import logging
import sys
import threading
import urllib.error
import urllib.request
from typing import Iterator, List, Optional, Sequence, Union

import torch
from PIL import Image, UnidentifiedImageError
from transformers import StoppingCriteria, TextIteratorStreamer, TextStreamer

from moellava.conversation import Conversation, get_conv_template
from moellava.errors import run_main
from moellava.mm_utils import (
    KeywordsStoppingCriteria,
    decode_answer,
    image_prompt_prefix,
    process_images,
    tokenizer_image_token,
    unused_vocabulary_rows,
)
from moellava.tokenization import FAMILIES, family_for_model_type
from moellava.utils import add_local_rank_argument

# DeepSpeed (imported by the MoE layers) creates its loggers on stdout; here stdout carries only answers.
with contextlib.redirect_stdout(sys.stderr):
    from moellava.model.builder import load_pretrained_model

logger = logging.getLogger(__name__)

Images = Union[None, Image.Image, Sequence[Image.Image]]
URL_TIMEOUT_S = 30


def default_conv_mode(config) -> str:
    """The template the checkpoint was trained with, else its family's default `--version`."""
    stored = getattr(config, "conv_template", None)
    if stored:
        return stored
    return FAMILIES[family_for_model_type(config.model_type)].version


def resolve_conv_mode(config, requested: Optional[str] = None) -> str:
    """`requested` when given (with a warning if it differs from the checkpoint's), else the checkpoint's."""
    conv_mode = default_conv_mode(config)
    if requested and requested != conv_mode:
        logger.warning("Using --conv-mode %s; the checkpoint's template is %s.", requested, conv_mode)
        return requested
    return conv_mode


class ChatSession:
    """A conversation about images; `ask` runs one turn and keeps the history.

    `image` (one PIL image, a list of them, or None for a text-only chat) belongs to the first user turn;
    `ask(..., images=[...])` attaches more images to a later turn.
    """

    def __init__(self, tokenizer, model, image_processor, image: Images, conv: Conversation, *,
                 temperature: float = 0.2, top_p: Optional[float] = None, max_new_tokens: int = 512):
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.conv = conv
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.images: List[torch.Tensor] = []  # pixel values of every image given so far, in prompt order
        self.unplaced = 0  # images given that the next user turn places
        self.image_prefix = image_prompt_prefix(model.config)
        self.suppress_tokens = unused_vocabulary_rows(model, tokenizer)
        self.add_images([] if image is None else [image] if isinstance(image, Image.Image) else list(image))

    def add_images(self, images: Sequence[Image.Image]) -> None:
        """Preprocess images for the next user turn (as the checkpoint was trained)."""
        if images:
            pixels = process_images(images, self.image_processor, self.model.config)
            dtype = next(self.model.parameters()).dtype
            self.images.extend(p.to(device=self.model.device, dtype=dtype) for p in pixels)
            self.unplaced += len(images)

    def add_user_turn(self, message: str, images: Sequence[Image.Image] = ()) -> None:
        """Append the user's message, after one placeholder per image not yet placed, and an open assistant
        turn."""
        self.add_images(images)
        message = self.image_prefix * self.unplaced + message
        self.unplaced = 0
        self.conv.append_message(self.conv.roles[0], message)
        self.conv.append_message(self.conv.roles[1], None)

    def prompt_ids(self) -> torch.Tensor:
        """The prompt up to the open assistant turn, as 1-D ids (-200 per image placeholder)."""
        prompt = self.conv.get_prompt()
        logger.debug("Prompt: %r", prompt)
        return tokenizer_image_token(prompt, self.tokenizer, return_tensors="pt")

    def reply(self, streamer=None, cancel: Optional[threading.Event] = None) -> str:
        """Generate the open assistant turn with this session's settings and store it in the history."""
        return generate_replies([self], temperature=self.temperature, top_p=self.top_p,
                                max_new_tokens=self.max_new_tokens, streamer=streamer, cancel=cancel)[0]

    def ask(self, message: str, streamer: Optional[TextStreamer] = None, *,
            images: Sequence[Image.Image] = ()) -> str:
        self.add_user_turn(message, images)
        return self.reply(streamer)

    def reopen_last_turn(self) -> None:
        """Forget the last reply (if it has one) so that `reply` generates it anew (regenerate)."""
        messages = self.conv.messages
        if len(messages) <= self.conv.offset or messages[-1][0] != self.conv.roles[1]:
            raise ValueError("There is no reply to regenerate yet: ask a question first.")
        messages[-1][1] = None

    @property
    def awaits_reply(self) -> bool:
        """Whether the last turn is open: asked, and not answered (yet)."""
        return len(self.conv.messages) > self.conv.offset and self.conv.messages[-1][1] is None

    def stream_reply(self) -> Iterator[str]:
        """`reply` in a background thread, yielding the reply so far as tokens arrive and last the reply as
        stored in the history. Closing the iterator early stops the generation at the next token."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        outcome = {}

        def run():
            try:
                outcome["reply"] = self.reply(streamer, cancel)
            except BaseException as error:  # re-raised in the caller's thread below
                outcome["error"] = error
                streamer.end()

        thread = threading.Thread(target=run, name="generate", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                if piece:
                    text += piece
                    yield text
        finally:
            cancel.set()
            thread.join()
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["reply"]

    def decode_reply(self, new_ids: torch.Tensor) -> str:
        """The reply as stored in history: no special tokens and no end-of-turn string, since the template
        adds its own (keeping it would double the end token in the next prompt)."""
        return decode_answer(self.tokenizer, new_ids, self.conv.stop_str)


class EndOfReplies(StoppingCriteria):
    """True once every row has ended its reply (the template's stop string, or an eos token), or when
    `cancel` is set. Remembers where each row ended, so a row that finished before the others is cut there:
    exactly what it would have generated alone."""

    def __init__(self, stop_str: str, tokenizer, input_ids: torch.Tensor, eos_token_ids: Sequence[int],
                 cancel: Optional[threading.Event] = None):
        self.keywords = KeywordsStoppingCriteria([stop_str], tokenizer, input_ids)
        self.eos_token_ids = set(eos_token_ids)
        self.start = input_ids.shape[1]
        self.ends: List[Optional[int]] = [None] * input_ids.shape[0]
        self.cancel = cancel

    def __call__(self, output_ids: torch.LongTensor, scores=None, **kwargs) -> bool:
        for row, ids in enumerate(output_ids):
            if self.ends[row] is None and (ids[-1].item() in self.eos_token_ids or self.keywords(ids[None])):
                self.ends[row] = ids.shape[0] - self.start
        return all(end is not None for end in self.ends) or (self.cancel is not None and self.cancel.is_set())

    def reply_ids(self, output_ids: torch.Tensor, row: int) -> torch.Tensor:
        end = self.ends[row]
        return output_ids[row, self.start:] if end is None else output_ids[row, self.start:self.start + end]


def generate_replies(sessions: Sequence[ChatSession], *, temperature: float, top_p: Optional[float],
                     max_new_tokens: int, streamer=None, cancel: Optional[threading.Event] = None) -> List[str]:
    """Generate the open assistant turn of every session in one left-padded batch; store and return the
    replies. One session (the CLI's case) needs no padding. Greedy replies of a batch equal the unbatched
    ones: each row is cut where it would have stopped alone, and the native MoE backend routes every token
    on its own (no capacity shared across the batch)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is negative: use 0 (greedy) or more.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1].")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    first = sessions[0]
    tokenizer, model = first.tokenizer, first.model
    stop_strs = {session.conv.stop_str for session in sessions}
    if len(stop_strs) > 1 or any(session.model is not model for session in sessions):
        raise ValueError("A batch of replies needs one model and one conversation template.")
    if len(sessions) > 1 and getattr(model.config, "tokenizer_padding_side", None) != "left":
        raise ValueError("Batched replies need the model loaded with load_pretrained_model(..., padding_side='left').")

    prompts = [session.prompt_ids() for session in sessions]
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = ids
        attention_mask[row, width - len(ids):] = 1
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    images = [image for session in sessions for image in session.images] or None

    eos = model.generation_config.eos_token_id
    eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    end = EndOfReplies(stop_strs.pop(), tokenizer, input_ids, eos_token_ids, cancel)
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, **({"top_p": top_p} if top_p is not None else {})}
    with torch.inference_mode():
        output_ids = model.generate(
            input_ids,
            attention_mask=attention_mask,
            images=images,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            use_cache=True,
            stopping_criteria=[end],
            suppress_tokens=first.suppress_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    replies = []
    for row, session in enumerate(sessions):
        reply = session.decode_reply(end.reply_ids(output_ids, row))
        session.conv.messages[-1][-1] = reply
        replies.append(reply)
    return replies


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose and load the checkpoint (the CLI's and the web demo's)."""
    parser.add_argument("--model-path", required=True, help="checkpoint folder (or Stage-1 folder with --model-base)")
    parser.add_argument("--model-base", default=None,
                        help="base LLM folder under a Stage-1 output, or the base of a LoRA checkpoint (default: "
                             "the one its adapter_config.json records)")
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, float16 on GPU")
    parser.add_argument("--moe-backend", default="native", choices=["native", "deepspeed"])
    parser.add_argument("--load-8bit", action="store_true", help="not available: needs bitsandbytes and a CUDA GPU")
    parser.add_argument("--load-4bit", action="store_true", help="not available: needs bitsandbytes and a CUDA GPU")
    add_local_rank_argument(parser)


def load_chat_model(args: argparse.Namespace):
    """`(tokenizer, model, image_processor, conv_mode)` for the flags of `add_model_arguments`."""
    tokenizer, model, processor, _ = load_pretrained_model(
        args.model_path, args.model_base, None, args.load_8bit, args.load_4bit, device=args.device,
        torch_dtype=args.dtype, moe_backend=args.moe_backend,
    )
    return tokenizer, model, processor["image"], resolve_conv_mode(model.config, args.conv_mode)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image-file", required=True, help="path or http(s) URL of the image to talk about")
    parser.add_argument("--query", default=None, help="answer this one question and exit")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--debug", action="store_true", help="log prompts")
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
    tokenizer, model, image_processor, conv_mode = load_chat_model(args)
    session = ChatSession(tokenizer, model, image_processor, image, get_conv_template(conv_mode),
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
