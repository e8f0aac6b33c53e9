"""The demo's synthetic data: images drawn as specified, answers that depend on the image, held-out images
that are new, determinism; and the demo's small helpers."""

import json
import os
import random
from collections import Counter

import pytest
from PIL import Image

from moellava.demo import data
from moellava.demo.run import first_word, loss_change
from moellava.tokenization import load_tokenizer
from moellava.tokenization.toy import build_toy_tokenizer


def test_draw_puts_the_shape_where_specified():
    red = data.COLOURS["red"]
    square = data.draw(data.ShapeSpec("red", "square", size=12, x=4, y=6))
    assert square.getpixel((4, 6)) == red and square.getpixel((15, 17)) == red
    assert square.getpixel((3, 6)) == data.BACKGROUND and square.getpixel((16, 17)) == data.BACKGROUND
    circle = data.draw(data.ShapeSpec("blue", "circle", size=16, x=8, y=8))
    assert circle.getpixel((16, 16)) == data.COLOURS["blue"]
    assert circle.getpixel((8, 8)) == data.BACKGROUND  # the bounding box's corner is outside the circle
    triangle = data.draw(data.ShapeSpec("green", "triangle", size=16, x=0, y=0))
    assert triangle.getpixel((8, 1)) == data.COLOURS["green"]  # apex at the top centre
    assert triangle.getpixel((0, 1)) == data.BACKGROUND and triangle.getpixel((0, 15)) == data.COLOURS["green"]
    with pytest.raises(ValueError, match="does not fit"):
        data.draw(data.ShapeSpec("red", "square", size=20, x=20, y=0))
    with pytest.raises(ValueError, match="unknown colour or shape"):
        data.draw(data.ShapeSpec("purple", "square", size=4, x=0, y=0))


def colour_of(path):
    """The colour name of an image's most frequent non-background pixel."""
    pixels = Counter(Image.open(path).convert("RGB").getdata())
    del pixels[data.BACKGROUND]
    rgb = pixels.most_common(1)[0][0]
    return next(name for name, value in data.COLOURS.items() if value == rgb)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo_data"))
    return out, data.build_dataset(out, num_train_images=40, num_eval_images=8, seed=3)


def load(path):
    with open(path) as f:
        return json.load(f)


def test_files_counts_and_text_only_share(dataset):
    _, paths = dataset
    stage1, stage2, stage3, held_out = (load(paths[key]) for key in ("stage1", "stage2", "stage3", "eval"))
    assert len(stage1) == 40 and len(held_out) == 8
    for samples in (stage2, stage3):
        assert len(samples) == 44 and sum("image" not in s for s in samples) == 4
        assert len({s["id"] for s in samples}) == 44
    for sample in stage1 + stage2 + stage3:
        images = [sample["image"]] if "image" in sample else []
        text = "".join(turn["value"] for turn in sample["conversations"])
        assert text.count("<image>") == len(images)
        assert sample["conversations"][0]["value"].startswith("<image>\n") == bool(images)
        assert all(os.path.isfile(os.path.join(paths["image_folder"], image)) for image in images)


def test_answers_depend_on_the_image(dataset):
    _, paths = dataset
    folder = paths["image_folder"]
    for sample in load(paths["stage1"]) + [s for s in load(paths["stage2"]) if "image" in s]:
        colour = colour_of(os.path.join(folder, sample["image"]))
        for question, answer in zip(sample["conversations"][::2], sample["conversations"][1::2]):
            text = question["value"]
            short = text.endswith("\n" + data.SHORT_ANSWER_PROMPT)
            if text.startswith(("Is there a ", "<image>\nIs there a ")):
                subject = text.split("Is there a ", 1)[1].split(" in the image?")[0]
                assert short and answer["value"] in ("yes", "no")
                if subject.endswith(" shape"):
                    assert (answer["value"] == "yes") == (subject == f"{colour} shape")
                else:
                    assert subject in data.SHAPES
            elif any(q in text for q in data.COLOUR_QUESTIONS):
                assert answer["value"] == (colour if short else f"A {colour} shape.")
            elif any(q in text for q in data.SHAPE_QUESTIONS):
                shapes = data.SHAPES if short else {f"A {shape}." for shape in data.SHAPES}
                assert answer["value"] in shapes
            else:
                assert answer["value"].startswith(f"A {colour} ")
    held_out = load(paths["eval"])
    assert [colour_of(os.path.join(folder, item["image"])) for item in held_out] == [i["colour"] for i in held_out]


def test_every_answer_starts_with_a_space_merged_token(dataset, tmp_path):
    """Generation continues after "ASSISTANT:"; an answer whose first token is a bare space piece would be
    masked as prompt in training and never generated (see the demo's data module)."""
    _, paths = dataset
    tokenizer = load_tokenizer(build_toy_tokenizer("llama", str(tmp_path / "tok")))
    answers = {turn["value"] for key in ("stage2", "stage3") for sample in load(paths[key])
               for turn in sample["conversations"][1::2]}
    assert {"yes", "no", "red", "circle"} <= answers
    for answer in answers:
        first = tokenizer.tokenize("ASSISTANT: " + answer)[2]
        assert first.startswith("▁") and first != "▁", answer


def test_held_out_images_are_new_and_every_combination_is_trained(dataset):
    _, paths = dataset
    train_images = {s["image"] for s in load(paths["stage1"])}
    held_out = load(paths["eval"])
    assert not train_images & {item["image"] for item in held_out}
    big = data.build_dataset(os.path.join(dataset[0], "big"), num_train_images=200, num_eval_images=1, seed=0)
    captions = {turn["value"] for s in load(big["stage1"]) for turn in s["conversations"][1::2]}
    assert captions == {f"A {c} {s}." for c in data.COLOURS for s in data.SHAPES}


def test_build_is_deterministic(tmp_path):
    first = data.build_dataset(str(tmp_path / "a"), num_train_images=6, num_eval_images=2, seed=5)
    second = data.build_dataset(str(tmp_path / "b"), num_train_images=6, num_eval_images=2, seed=5)
    other = data.build_dataset(str(tmp_path / "c"), num_train_images=6, num_eval_images=2, seed=6)
    for key in ("stage1", "stage2", "stage3", "eval"):
        assert load(first[key]) == load(second[key])
    assert load(first["stage2"]) != load(other["stage2"])
    name = load(first["stage1"])[0]["image"]
    with open(os.path.join(first["image_folder"], name), "rb") as a, \
            open(os.path.join(second["image_folder"], name), "rb") as b:
        assert a.read() == b.read()


def test_random_specs_fit_and_cover_sizes():
    rng = random.Random(0)
    specs = [data.random_spec(rng) for _ in range(300)]
    assert all(s.x + s.size <= data.IMAGE_SIZE and s.y + s.size <= data.IMAGE_SIZE for s in specs)
    assert min(s.size for s in specs) == 14 and max(s.size for s in specs) == 24


def test_demo_helpers():
    assert first_word("a blue circle, not red", ["red", "blue"]) == "blue"
    assert first_word("a shape", ["red", "blue"]) is None
    assert loss_change([6.0, 5.0, 4.0, 3.0, 1.0, 0.5]) == (5.5, 0.75)
    assert loss_change([2.0, 1.0]) == (2.0, 1.0)


def test_demo_benchmark_sets(dataset):
    """The demo's POPE-style set: per category and image one "yes" question about what the image shows and
    one "no" question about a colour or shape it does not show, drawn as the category says; the
    TextVQA-style set asks colour and shape with 10 reference answers."""
    from moellava.demo import benchmarks

    _, paths = dataset
    items = load(paths["eval"])
    counts = benchmarks.train_counts(paths["stage1"])
    assert sum(counts[c] for c in data.COLOURS) == sum(counts[s] for s in data.SHAPES) == 40
    questions = benchmarks.pope_questions(items, paths["image_folder"], counts)
    assert len(questions) == 3 * 2 * len(items)
    for category in benchmarks.POPE_CATEGORIES:
        members = [q for q in questions if q["category"] == category]
        assert [q["label"] for q in members] == ["yes", "no"] * len(items)
        for index, item in enumerate(items):
            yes, no = members[2 * index]["text"], members[2 * index + 1]["text"]
            assert yes.endswith("\n" + data.SHORT_ANSWER_PROMPT)
            assert (f"a {item['colour']} shape" in yes) if index % 2 == 0 else (f"a {item['shape']} in" in yes)
            absent = no.split("Is there a ", 1)[1].split(" in the image?")[0]
            truth = item["shape"] if index % 2 == 0 else item["colour"]
            value = absent.replace(" shape", "")
            assert value != truth
            if category == "adversarial":
                assert value == benchmarks.CONFUSED[truth]
            if category == "popular":
                pool = data.SHAPES if index % 2 == 0 else sorted(data.COLOURS)
                assert value == max((v for v in pool if v != truth), key=lambda v: (counts[v], v))
    vqa = benchmarks.textvqa_questions(items, paths["image_folder"])
    assert vqa[0]["question"] == data.COLOUR_QUESTIONS[0] and vqa[0]["answers"] == [items[0]["colour"]] * 10
    assert vqa[1]["answers"] == [items[0]["shape"]] * 10
