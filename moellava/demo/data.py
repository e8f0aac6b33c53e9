"""Synthetic image-instruction data for the demo: one coloured shape on a plain background.

Every image shows a circle, a square or a triangle in red, green, blue or yellow, at a random size and
position. Stage 1 trains on captions ("A red circle."); stages 2 and 3 on conversations whose answers
depend on the image ("What colour is the shape?" -> "A red shape."; with LLaVA-1.5's short-answer
instruction -> "red"; "Is there a circle in the image?" + the instruction -> "yes" / "no", the form of the
POPE and VQA questions the demo evaluates on), mixed with a few text-only samples. The
held-out set uses its own random draws (new positions and sizes), so the evaluation measures what the
model reads from pixels, not what it memorised. Everything is deterministic given the seed.
"""

import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Tuple

from PIL import Image, ImageDraw

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (24, 24, 24)
IMAGE_SIZE = 32

COLOUR_QUESTIONS = ("What colour is the shape?", "What is the colour of the shape?", "Which colour do you see?")
SHAPE_QUESTIONS = ("What shape is it?", "Which shape is in the image?", "What shape do you see?")
CAPTION_QUESTIONS = ("Describe the image briefly.", "What is in the image?")
# LLaVA-1.5's instruction for short answers (its VQA training data and benchmark question files use it).
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
# Text-only samples, mixed into stages 2 and 3 as in the real recipes (nlp_tune.json).
TEXT_ONLY = (
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a square have?", "A square has four sides."),
    ("Is a circle round?", "A circle is round, yes."),
    ("Name the colours you know.", "A few: red, green, blue and yellow."),
)


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    size: int  # side or diameter, in pixels
    x: int  # top-left corner of the shape's bounding box
    y: int

    @property
    def caption(self) -> str:
        return f"A {self.colour} {self.shape}."


def random_spec(rng: random.Random, image_size: int = IMAGE_SIZE) -> ShapeSpec:
    size = rng.randint(image_size * 7 // 16, image_size * 3 // 4)
    return ShapeSpec(
        colour=rng.choice(sorted(COLOURS)),
        shape=rng.choice(SHAPES),
        size=size,
        x=rng.randint(0, image_size - size),
        y=rng.randint(0, image_size - size),
    )


def draw(spec: ShapeSpec, image_size: int = IMAGE_SIZE) -> Image.Image:
    """The RGB image of `spec`."""
    if spec.colour not in COLOURS or spec.shape not in SHAPES:
        raise ValueError(f"unknown colour or shape in {spec}: colours {sorted(COLOURS)}, shapes {SHAPES}")
    if not (0 <= spec.x and 0 <= spec.y and spec.x + spec.size <= image_size and spec.y + spec.size <= image_size):
        raise ValueError(f"{spec} does not fit in a {image_size}x{image_size} image")
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    box = (spec.x, spec.y, spec.x + spec.size - 1, spec.y + spec.size - 1)
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        canvas.ellipse(box, fill=fill)
    elif spec.shape == "square":
        canvas.rectangle(box, fill=fill)
    else:
        left, top, right, bottom = box
        canvas.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image


# Every answer starts with "A" or a lower-case word: the toy tokenizer has the pieces "▁A", "▁red", "▁y", ...,
# so the space after "ASSISTANT:" and the answer's first word are one token, which training labels and
# generation produces after the prompt.
def colour_answer(spec: ShapeSpec) -> str:
    return f"A {spec.colour} shape."


def shape_answer(spec: ShapeSpec) -> str:
    return f"A {spec.shape}."


def short_question(question: str) -> str:
    return question + "\n" + SHORT_ANSWER_PROMPT


def probe_question(subject: str) -> str:
    """A POPE-style question about `subject`: a colour ("red shape") or a shape ("circle")."""
    return short_question(f"Is there a {subject} in the image?")


def probe_turn(spec: ShapeSpec, rng: random.Random) -> Tuple[str, str]:
    """A yes/no question about the image's colour or shape, answered "yes" half of the time. Short answers
    are lower-case, as VQA answers (and they start with a space-merged token, see below)."""
    if rng.random() < 0.5:
        subject = f"{spec.colour} shape" if rng.random() < 0.5 else spec.shape
        return probe_question(subject), "yes"
    if rng.random() < 0.5:
        subject = f"{rng.choice([c for c in sorted(COLOURS) if c != spec.colour])} shape"
    else:
        subject = rng.choice([s for s in SHAPES if s != spec.shape])
    return probe_question(subject), "no"


def short_answer_turn(spec: ShapeSpec, rng: random.Random) -> Tuple[str, str]:
    if rng.random() < 0.5:
        return short_question(rng.choice(COLOUR_QUESTIONS)), spec.colour
    return short_question(rng.choice(SHAPE_QUESTIONS)), spec.shape


def caption_sample(sample_id: str, image: str, spec: ShapeSpec, rng: random.Random) -> dict:
    return {
        "id": sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_QUESTIONS)},
            {"from": "gpt", "value": spec.caption},
        ],
    }


def conversation_sample(sample_id: str, image: str, spec: ShapeSpec, rng: random.Random) -> dict:
    """One to three question-answer turns about the image, in random order; `<image>` opens the first.
    Three keep the longest sample, its image expanded, within the demo's 256 tokens."""
    turns = [
        (rng.choice(COLOUR_QUESTIONS), colour_answer(spec)),
        (rng.choice(SHAPE_QUESTIONS), shape_answer(spec)),
        (rng.choice(CAPTION_QUESTIONS), spec.caption),
        short_answer_turn(spec, rng),
        probe_turn(spec, rng),
    ]
    rng.shuffle(turns)
    turns = turns[: rng.randint(1, 3)]
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": sample_id, "image": image, "conversations": conversations}


def text_only_sample(sample_id: str, rng: random.Random) -> dict:
    question, answer = rng.choice(TEXT_ONLY)
    return {
        "id": sample_id,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def build_dataset(
    out_dir: str,
    *,
    num_train_images: int = 600,
    num_eval_images: int = 48,
    text_only_fraction: float = 0.1,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
) -> Dict[str, str]:
    """Write images and the data files into `out_dir`; returns their paths.

    Keys: `image_folder`, `stage1` (captions), `stage2` and `stage3` (conversations + text-only samples,
    different draws of the same images), `eval` (held-out images: a list of
    `{"image", "colour", "shape"}`).
    """
    rng = random.Random(seed)
    image_folder = os.path.join(out_dir, "images")
    os.makedirs(image_folder, exist_ok=True)

    def make_images(prefix: str, count: int) -> List[Tuple[str, ShapeSpec]]:
        items = []
        for i in range(count):
            spec = random_spec(rng, image_size)
            name = f"{prefix}_{i:05d}.png"
            draw(spec, image_size).save(os.path.join(image_folder, name))
            items.append((name, spec))
        return items

    train = make_images("train", num_train_images)
    held_out = make_images("eval", num_eval_images)

    stage1 = [caption_sample(f"cap-{i}", name, spec, rng) for i, (name, spec) in enumerate(train)]
    stages = {}
    for stage in ("stage2", "stage3"):
        samples = [conversation_sample(f"{stage}-{i}", name, spec, rng) for i, (name, spec) in enumerate(train)]
        num_text = int(round(text_only_fraction * len(samples)))
        samples += [text_only_sample(f"{stage}-text-{i}", rng) for i in range(num_text)]
        rng.shuffle(samples)
        stages[stage] = samples

    paths = {"image_folder": image_folder}
    for key, data in (("stage1", stage1), ("stage2", stages["stage2"]), ("stage3", stages["stage3"])):
        paths[key] = os.path.join(out_dir, f"{key}.json")
        _write_json(paths[key], data)
    paths["eval"] = os.path.join(out_dir, "eval.json")
    _write_json(paths["eval"], [{"image": name, "colour": spec.colour, "shape": spec.shape} for name, spec in held_out])
    return paths
