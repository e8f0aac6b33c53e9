"""The web demo's page (`python -m moellava.serve.gradio_web_server`): upload checks, the chat handlers
over the CLI's `ChatSession`, and the Gradio layout. Import it after setting GRADIO_TEMP_DIR: Gradio
fixes its temporary folder when it is imported."""

import html
import os
from typing import List, Optional

import gradio as gr
from PIL import Image, UnidentifiedImageError

from moellava.conversation import get_conv_template
from moellava.demo import data as shapes
from moellava.model.moe import moe_blocks
from moellava.serve.cli import ChatSession

IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
MAX_PIXELS = 50_000_000  # far above any tower's input, well below PIL's decompression-bomb guard
# System font stacks: the default theme's web fonts would be fetched from the internet by every browser.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class UploadError(ValueError):
    """An upload the model cannot take; the message is shown in the page."""


def load_upload(path: str, max_bytes: int, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The uploaded file as an RGB image, or an UploadError naming the file and what to upload instead."""
    name = os.path.basename(path)
    formats = ", ".join(IMAGE_FORMATS)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UploadError(f"{name} is {size / 2**20:.1f} MB; images up to {max_bytes / 2**20:g} MB are accepted "
                          "(--max-upload-mb).")
    try:
        with Image.open(path) as image:
            if image.format not in IMAGE_FORMATS:
                raise UploadError(f"{name} is a {image.format} file, not an image format the demo takes ({formats}).")
            if image.width * image.height > max_pixels:
                raise UploadError(f"{name} has {image.width}x{image.height} pixels; at most {max_pixels:,} are "
                                  "accepted. Upload a smaller image.")
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here
    except UploadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL's "cannot identify" message names the server's copy of the file; the user knows it by its name.
        reason = "its format is not recognised" if isinstance(error, UnidentifiedImageError) else str(error)
        raise UploadError(f"{name} is not a readable image ({reason}). Upload a {formats} file.") from None


def write_examples(folder: str) -> List[dict]:
    """Example questions about coloured shapes (the demo's data), drawn into `folder`."""
    os.makedirs(folder, exist_ok=True)
    examples = []
    for spec, question in (
        (shapes.ShapeSpec("red", "circle", size=160, x=40, y=50), shapes.COLOUR_QUESTIONS[0]),
        (shapes.ShapeSpec("blue", "triangle", size=150, x=50, y=30), shapes.SHAPE_QUESTIONS[0]),
        (shapes.ShapeSpec("green", "square", size=120, x=70, y=60), shapes.CAPTION_QUESTIONS[0]),
    ):
        path = os.path.join(folder, f"{spec.colour}_{spec.shape}.png")
        shapes.draw(spec, image_size=240).save(path)
        examples.append({"text": question, "files": [path]})
    return examples


def describe_model(model_path: str, model, conv_mode: str) -> str:
    """One line under the title: checkpoint, template, MoE layers, device and dtype."""
    blocks = moe_blocks(model)
    if blocks:
        layers = ", ".join(str(block.layer_idx) for block in blocks)
        experts = "/".join(str(n) for n in sorted({block.num_experts for block in blocks}))
        moe = f"MoE layers {layers}: {experts} experts, top-{blocks[0].top_k}, {blocks[0].backend} backend"
    else:
        moe = "dense (no MoE layers)"
    parameter = next(model.parameters())
    return (f"`{os.path.basename(os.path.normpath(model_path))}` · template `{conv_mode}` · {moe} · "
            f"{parameter.device.type} {str(parameter.dtype).replace('torch.', '')}")


class WebChat:
    """The page's handlers over one loaded model; each browser tab keeps its own ChatSession (gr.State)."""

    def __init__(self, tokenizer, model, image_processor, conv_mode: str, max_upload_bytes: int):
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.conv_mode = conv_mode
        self.max_upload_bytes = max_upload_bytes

    def add_turn(self, message: Optional[dict], history: list, session: Optional[ChatSession]):
        """The user's turn: check the uploads, open the turn, show it and clear the input box. A refused
        turn changes nothing and says why in a notice."""
        text = ((message or {}).get("text") or "").strip()
        files = (message or {}).get("files") or []
        if not text:
            gr.Warning("Type a question to go with the images.")
            return gr.skip(), gr.skip(), gr.skip()
        if session is not None and session.awaits_reply:
            gr.Warning("The last question has no answer yet: wait for it, or press Regenerate.")
            return gr.skip(), gr.skip(), gr.skip()
        try:
            images = [load_upload(path, self.max_upload_bytes) for path in files]
        except UploadError as error:
            gr.Warning(html.escape(str(error)), title="Upload refused")  # the notice renders HTML
            return gr.skip(), gr.skip(), gr.skip()
        if session is None:
            session = ChatSession(self.tokenizer, self.model, self.image_processor, None,
                                  get_conv_template(self.conv_mode))
        session.add_user_turn(text, images)
        shown = [{"role": "user", "content": {"path": path}} for path in files]
        shown += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        return history + shown, session, None

    def stream(self, history: list, session: Optional[ChatSession], temperature: float, top_p: float,
               max_new_tokens: float):
        """The open turn's reply, shown as it is generated."""
        if session is None or not session.awaits_reply:  # the turn was refused
            yield gr.skip()  # (a generator that yields nothing would empty the chat)
            return
        session.temperature, session.top_p, session.max_new_tokens = temperature, top_p, int(max_new_tokens)
        history = list(history)
        for text in session.stream_reply():
            history[-1] = {"role": "assistant", "content": text}
            yield history

    def regenerate(self, history: list, session: Optional[ChatSession]):
        """Reopen the last reply; `stream` then generates it anew."""
        try:
            if session is None:
                raise ValueError("There is no reply to regenerate yet: ask a question first.")
            session.reopen_last_turn()
        except ValueError as error:
            gr.Warning(str(error))
            return gr.skip()
        return history[:-1] + [{"role": "assistant", "content": ""}]

    @staticmethod
    def clear():
        return [], None, None


def build_demo(chat: WebChat, title: str, description: str, examples: List[dict], *, temperature: float,
               top_p: float, max_new_tokens: int, render_markdown: bool) -> "gr.Blocks":
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n{description}")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=7):
                chatbot = gr.Chatbot(label=title, height=480, render_markdown=render_markdown, buttons=["copy_all"],
                                     elem_id="chatbot")
                box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", show_label=False,
                                           placeholder="Attach images, type a question and press Enter",
                                           elem_id="question")
                with gr.Row():
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=3):
                temperature_slider = gr.Slider(0, 1, value=temperature, step=0.05, label="Temperature (0 = greedy)")
                top_p_slider = gr.Slider(0.05, 1, value=top_p, step=0.05, label="Top-p")
                max_tokens_slider = gr.Slider(1, 2048, value=max_new_tokens, step=1, label="Max new tokens")
                gr.Examples(examples=[[example] for example in examples], inputs=[box], label="Examples")
        settings = [temperature_slider, top_p_slider, max_tokens_slider]
        # One queue for every event: a turn cannot be added or cleared while an answer is being generated.
        queue = dict(concurrency_id="model", concurrency_limit=1)
        box.submit(chat.add_turn, [box, chatbot, session], [chatbot, session, box], **queue).then(
            chat.stream, [chatbot, session, *settings], [chatbot], **queue)
        regenerate.click(chat.regenerate, [chatbot, session], [chatbot], **queue).then(
            chat.stream, [chatbot, session, *settings], [chatbot], **queue)
        clear.click(chat.clear, None, [chatbot, session, box], **queue)
        chatbot.clear(chat.clear, None, [chatbot, session, box], **queue)  # the chat's own bin icon
    return demo
