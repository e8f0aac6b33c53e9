"""The demo's benchmark step: a POPE-style yes/no set and a TextVQA-style set built from the held-out
coloured shapes, in the official file formats, answered and scored by `scripts/eval/pope.sh` and
`scripts/eval/textvqa.sh`, i.e. the same code path as the real benchmarks.

POPE categories differ in how the absent object of a "no" question is drawn, as in POPE: `random` (any
other colour or shape), `popular` (the most frequent other one in the training images), `adversarial`
(the one most easily confused: red<->yellow, green<->blue, circle<->square, triangle<->square).
The TextVQA-style set asks for the colour and the shape (short answers); its 10 reference answers are
the right word. The writers (`write_pope`, `write_textvqa`) also serve the eval tests.
"""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from typing import Callable, Dict, List, Sequence

from moellava.demo import data

POPE_CATEGORIES = ("adversarial", "popular", "random")
CONFUSED = {"red": "yellow", "yellow": "red", "green": "blue", "blue": "green",
            "circle": "square", "square": "circle", "triangle": "square"}


def _write_jsonl(path: str, records: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _copy_images(sources: Sequence[str], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for source in sorted(set(sources)):
        shutil.copy(source, os.path.join(folder, os.path.basename(source)))


def write_pope(eval_dir: str, questions: Sequence[dict]) -> None:
    """POPE's layout under `eval_dir/pope`: `llava_pope_test.jsonl` ({question_id, image, text, category}),
    `coco/coco_pope_<category>.json` (jsonl {question_id, image, text, label}, in question order) and the
    images in `val2014/`. `questions`: {"image": path, "text", "label": "yes"/"no", "category"}."""
    root = os.path.join(eval_dir, "pope")
    _write_jsonl(os.path.join(root, "llava_pope_test.jsonl"), [
        {"question_id": i, "image": os.path.basename(q["image"]), "text": q["text"], "category": q["category"]}
        for i, q in enumerate(questions)])
    for category in sorted({q["category"] for q in questions}):
        members = [q for q in questions if q["category"] == category]
        _write_jsonl(os.path.join(root, "coco", f"coco_pope_{category}.json"), [
            {"question_id": i + 1, "image": os.path.basename(q["image"]), "text": q["text"].split("\n")[0],
             "label": q["label"]} for i, q in enumerate(members)])
    _copy_images([q["image"] for q in questions], os.path.join(root, "val2014"))


def write_textvqa(eval_dir: str, questions: Sequence[dict]) -> None:
    """TextVQA's layout under `eval_dir/textvqa`: LLaVA's `llava_textvqa_val_v051_ocr.jsonl` (question_id = the
    image id, text = question + [OCR line] + instruction), `TextVQA_0.5.1_val.json` and `train_images/`.
    `questions`: {"image": path, "question", "answers": [10 str], optional "ocr_tokens"}."""
    root = os.path.join(eval_dir, "textvqa")
    lines, annotations = [], []
    for number, q in enumerate(questions):
        image_id = os.path.splitext(os.path.basename(q["image"]))[0]
        ocr = f"\nReference OCR token: {', '.join(q['ocr_tokens'])}" if q.get("ocr_tokens") else ""
        lines.append({"question_id": image_id, "image": os.path.basename(q["image"]),
                      "text": f"{q['question']}{ocr}\n{data.SHORT_ANSWER_PROMPT}"})
        annotations.append({"question": q["question"], "image_id": image_id, "question_id": number,
                            "answers": list(q["answers"])})
    _write_jsonl(os.path.join(root, "llava_textvqa_val_v051_ocr.jsonl"), lines)
    with open(os.path.join(root, "TextVQA_0.5.1_val.json"), "w", encoding="utf-8") as f:
        json.dump({"dataset_type": "val", "dataset_name": "textvqa", "data": annotations}, f)
    _copy_images([q["image"] for q in questions], os.path.join(root, "train_images"))


def pope_questions(items: List[dict], image_folder: str, train_specs: Counter) -> List[dict]:
    """Per category and held-out image: one "yes" question (about its colour or its shape, alternating) and
    one "no" question about a colour or shape it does not have."""
    def absent(kind: str, truth: str, category: str, index: int) -> str:
        others = [v for v in (sorted(data.COLOURS) if kind == "colour" else data.SHAPES) if v != truth]
        if category == "popular":
            return max(others, key=lambda v: (train_specs[v], v))
        if category == "adversarial":
            return CONFUSED[truth]
        return others[index % len(others)]

    def subject(kind: str, value: str) -> str:
        return f"{value} shape" if kind == "colour" else value

    questions = []
    for category in POPE_CATEGORIES:
        for index, item in enumerate(items):
            image = os.path.join(image_folder, item["image"])
            present, missing = ("colour", "shape") if index % 2 == 0 else ("shape", "colour")
            questions.append({"image": image, "category": category, "label": "yes",
                              "text": data.probe_question(subject(present, item[present]))})
            value = absent(missing, item[missing], category, index)
            questions.append({"image": image, "category": category, "label": "no",
                              "text": data.probe_question(subject(missing, value))})
    return questions


def textvqa_questions(items: List[dict], image_folder: str) -> List[dict]:
    questions = []
    for item in items:
        image = os.path.join(image_folder, item["image"])
        questions.append({"image": image, "question": data.COLOUR_QUESTIONS[0], "answers": [item["colour"]] * 10})
        questions.append({"image": image, "question": data.SHAPE_QUESTIONS[0], "answers": [item["shape"]] * 10})
    return questions


def train_counts(train_file: str) -> Counter:
    """How often each colour and shape is captioned in the stage-1 data ("A red circle.")."""
    with open(train_file, encoding="utf-8") as f:
        samples = json.load(f)
    counts = Counter()
    for sample in samples:
        _, colour, shape = sample["conversations"][1]["value"].rstrip(".").split(" ")
        counts.update([colour, shape])
    return counts


def evaluate_benchmarks(model_dir: str, paths: Dict[str, str], out_dir: str, repo_dir: str,
                        environment: Callable[[Dict[str, str]], Dict[str, str]],
                        batch: int = 16) -> Dict[str, float]:
    """Write the two sets under `out_dir/eval`, run the two eval scripts on the model (their commands and
    score lines are printed) and return the headline scores: POPE F1 and accuracy (means over the
    categories) and TextVQA accuracy, in percent."""
    with open(paths["eval"], encoding="utf-8") as f:
        items = json.load(f)
    eval_dir = os.path.join(out_dir, "eval")
    write_pope(eval_dir, pope_questions(items, paths["image_folder"], train_counts(paths["stage1"])))
    write_textvqa(eval_dir, textvqa_questions(items, paths["image_folder"]))
    env = environment({"CKPT": model_dir, "CKPT_NAME": "demo", "EVAL": eval_dir, "BATCH": str(batch),
                       "WORKERS": "0", "PYTHON": sys.executable, "EXTRA_ARGS": "--max_new_tokens 8 --device cpu"})
    for script in ("pope.sh", "textvqa.sh"):
        command = ["bash", os.path.join(repo_dir, "scripts", "eval", script)]
        print(f"\n=== Benchmark: scripts/eval/{script} ===", flush=True)
        result = subprocess.run(command, env=env, cwd=repo_dir, capture_output=True, text=True)
        shown = [line for line in result.stdout.splitlines()
                 if line.startswith(("+", "Category", "Accuracy", "F1", "Yes ratio", "Mean over", "Samples"))]
        print("\n".join(shown), flush=True)
        if result.returncode != 0:
            raise SystemExit(f"scripts/eval/{script} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    scores_dir = os.path.join(eval_dir, "scores", "demo")
    with open(os.path.join(scores_dir, "pope.json"), encoding="utf-8") as f:
        pope = json.load(f)["metrics"]
    with open(os.path.join(scores_dir, "textvqa.json"), encoding="utf-8") as f:
        textvqa = json.load(f)["metrics"]
    categories = pope["categories"].values()
    return {"pope_f1": pope["f1"], "pope_accuracy": pope["accuracy"], "textvqa_accuracy": textvqa["accuracy"],
            "pope_yes_ratio": 100.0 * sum(m["yes_ratio"] for m in categories) / len(categories)}
