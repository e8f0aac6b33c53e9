"""Tiny benchmark files in the official formats, for the eval tests: written here from the formats' public
descriptions (LLaVA's eval.zip layout, POPE, TextVQA, GQA, MME, MMBench, SEED, LLaVA-Bench, MM-Vet).

`build_eval_tree(root)` writes an `eval/` folder with every benchmark the scripts of scripts/eval/ run on:
a few questions each, random images of several sizes. POPE and TextVQA use the demo's writers.
"""

import base64
import csv
import json
import os
from io import BytesIO
from pathlib import Path
from typing import Dict, List

from PIL import Image

import tiny_llava
from moellava.demo.benchmarks import write_pope, write_textvqa

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
SIZES = ((40, 30), (24, 48), (64, 64), (33, 17))


def write_json(path, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data), encoding="utf-8")


def write_jsonl(path, records) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def image(path, index: int = 0) -> str:
    """A random RGB image at `path`, one of a few sizes (`index` picks size and pixels)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return tiny_llava.write_test_image(str(path), size=SIZES[index % len(SIZES)], seed=index)


def base64_png(folder, index: int) -> str:
    """A random image (written to `folder`) as MMBench stores it: base64 PNG data."""
    buffer = BytesIO()
    Image.open(image(Path(folder) / f"{index}.png", index)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split")


def write_mmbench(path, rows: List[Dict]) -> None:
    """An MMBench TSV: the given cells, a base64 PNG per row, "nan" where a cell is not given."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(MMBENCH_COLUMNS)
        for number, row in enumerate(rows):
            cells = {"category": "object", "source": "test", "l2-category": "perception", "comment": "nan",
                     "split": "dev", "image": base64_png(Path(path).parent / "tsv_images", number), **row}
            writer.writerow([cells.get(column, "nan") for column in MMBENCH_COLUMNS])


MME_WITH_IMAGES = ("artwork", "celebrity", "landmark", "posters", "scene")
MME_TASKS = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
             "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def write_mme(eval_dir, images_per_task: Dict[str, int] = None) -> List[dict]:
    """MME_Benchmark_release_version (images/ + questions_answers_YN/ for the five image-folder categories,
    flat otherwise) with a yes and a no question per image, and LLaVA's llava_mme.jsonl (question + LLaVA's
    short-answer line). OCR's "no" questions are written with two spaces before "Please", as some of
    the benchmark's are. Returns the questions, in file order, each with its "truth"."""
    root = Path(eval_dir) / "MME"
    bench = root / "MME_Benchmark_release_version"
    questions = []
    for task in MME_TASKS:
        for k in range((images_per_task or {}).get(task, 1)):
            if task in MME_WITH_IMAGES:
                name = f"{10002 + k}.jpg"
                image_path, qa_dir, relative = bench / task / "images" / name, bench / task / "questions_answers_YN", \
                    f"{task}/images/{name}"
            else:
                name = f"{k + 1:04d}.png"
                image_path, qa_dir, relative = bench / task / name, bench / task, f"{task}/{name}"
            image(image_path, k)
            pairs = [(f"Is there {task} in image {k}?", "Yes"), (f"Is there no {task} in image {k}?", "No")]
            lines = []
            for question, truth in pairs:
                gap = "  " if task == "OCR" and truth == "No" else " "
                lines.append(f"{question}{gap}Please answer yes or no.\t{truth}\n")
                questions.append({"question_id": f"{task}/{name}", "image": relative, "text": question + SHORT,
                                  "category": task, "truth": truth})
            qa_dir.mkdir(parents=True, exist_ok=True)
            (qa_dir / (os.path.splitext(name)[0] + ".txt")).write_text("".join(lines), encoding="utf-8")
    write_jsonl(root / "llava_mme.jsonl", [{k: v for k, v in q.items() if k != "truth"} for q in questions])
    return questions


def build_eval_tree(root) -> Path:
    """`root/eval` with every benchmark of scripts/eval/, in LLaVA's layout; returns the eval folder."""
    eval_dir = Path(root) / "eval"
    sources = [image(Path(root) / "src" / f"img{i}.png", i) for i in range(4)]

    write_pope(str(eval_dir), [
        {"image": sources[i % 4], "text": f"Is there a {thing} in the image?" + SHORT, "label": label,
         "category": category}
        for category in ("adversarial", "popular", "random")
        for i, (thing, label) in enumerate([("cat", "yes"), ("dog", "no"), ("car", "yes")])])
    write_textvqa(str(eval_dir), [
        {"image": sources[0], "question": "what does it say?", "answers": ["stop"] * 10, "ocr_tokens": ["stop"]},
        {"image": sources[1], "question": "what brand is it?", "answers": ["acme"] * 10},
        {"image": sources[2], "question": "what number is it?", "answers": ["3"] * 7 + ["three"] * 3}])

    sqa = eval_dir / "scienceqa"
    problems, items = {}, []
    for i in range(4):
        pid = str(100 + i)
        has_image = i % 2 == 0
        problems[pid] = {"question": f"Which is {i}?", "choices": ["a", "b", "c"], "answer": i % 3,
                         "hint": "Hint." if i == 1 else "", "image": "image.png" if has_image else None,
                         "subject": "natural science", "grade": f"grade{i + 2}", "split": "test"}
        item = {"id": pid, "conversations": [
            {"from": "human", "value": f"Context: N/A\nQuestion: Which is {i}?\nOptions: (A) a (B) b (C) c" +
                                       ("\n<image>" if has_image else "")},
            {"from": "gpt", "value": "ABC"[i % 3]}]}
        if has_image:
            item["image"] = f"{pid}/image.png"
            image(sqa / "images" / "test" / pid / "image.png", i)
        items.append(item)
    write_json(sqa / "llava_test_CQM-A.json", items)
    write_json(sqa / "problems.json", problems)
    write_json(sqa / "pid_splits.json", {"test": sorted(problems)})

    write_mme(eval_dir)

    gqa = eval_dir / "gqa"
    gqa_questions = {}
    lines = []
    for i, (text, answer, structural) in enumerate([("Is there a cat?", "yes", "verify"),
                                                    ("What color is it?", "red", "query"),
                                                    ("What is on the table?", "cup", "query")]):
        qid, image_id = f"20{i}", f"n{i}"
        image(gqa / "data" / "images" / f"{image_id}.jpg", i)
        gqa_questions[qid] = {"imageId": image_id, "question": text, "answer": answer, "isBalanced": True,
                              "entailed": [], "equivalent": [qid],
                              "types": {"structural": structural, "semantic": "attr", "detailed": "x"},
                              "groups": {"global": None if structural == "verify" else "thing", "local": None},
                              "semantic": [{"operation": "select", "argument": "x", "dependencies": []}]}
        lines.append({"question_id": qid, "image": f"{image_id}.jpg", "text": text + SHORT})
    write_jsonl(gqa / "llava_gqa_testdev_balanced.jsonl", lines)
    write_json(gqa / "data" / "questions1.2" / "testdev_balanced_questions.json", gqa_questions)

    vqav2 = eval_dir / "vqav2"
    test = []
    for i in range(4):
        name = f"COCO_test2015_{i:012d}.jpg"
        image(vqav2 / "test2015" / name, i)
        test.append({"question_id": 1000 + i, "image": name, "text": f"How many things {i}?" + SHORT})
    write_jsonl(vqav2 / "llava_vqav2_mscoco_test2015.jsonl", test)
    write_jsonl(vqav2 / "llava_vqav2_mscoco_test-dev2015.jsonl", test[:3])  # test-dev: a subset

    vizwiz = eval_dir / "vizwiz"
    write_jsonl(vizwiz / "llava_test.jsonl", [
        {"question_id": i, "image": f"VizWiz_test_{i:08d}.jpg", "text": "What is this?\nWhen the provided "
         "information is insufficient, respond with 'Unanswerable'." + SHORT} for i in range(2)])
    for i in range(2):
        image(vizwiz / "test" / f"VizWiz_test_{i:08d}.jpg", i)

    seed = eval_dir / "seed_bench"
    seed_questions, lines = [], []
    for i, data_type in enumerate(["image", "image", "video"]):
        folder = "SEED-Bench-image" if data_type == "image" else "SEED-Bench-video-image"
        image(seed / folder / f"{i}.png", i)
        seed_questions.append({"question_id": str(300 + i), "data_type": data_type, "question_type_id": 1 + i % 2,
                               "answer": "AB"[i % 2], "question": f"Which {i}?", "choice_a": "x", "choice_b": "y",
                               "choice_c": "z", "choice_d": "w", "data_id": f"{i}.png"})
        lines.append({"question_id": 300 + i, "image": f"{folder}/{i}.png",
                      "text": f"Which {i}?\nA. x\nB. y\nC. z\nD. w" + LETTER})
    write_jsonl(seed / "llava-seed-bench.jsonl", lines)
    write_json(seed / "SEED-Bench.json", {"question_type": {"Scene Understanding": 1, "Instance Identity": 2},
                                          "questions": seed_questions})

    rows = [dict(index=i, question=f"What is {i}?", hint="nan" if i else "A hint.", A="cat", B="dog",
                 C="cow" if i < 2 else "nan", D="nan", answer="A") for i in range(3)]
    write_mmbench(eval_dir / "mmbench" / "mmbench_dev_20230712.tsv", rows)
    write_mmbench(eval_dir / "mmbench" / "mmbench_dev_cn_20231003.tsv", [
        dict(row, question=f"这是什么 {i}?") for i, row in enumerate(rows)])

    bench = eval_dir / "llava-bench-in-the-wild"
    for i in range(2):
        image(bench / "images" / f"{i:03d}.jpg", i)
    write_jsonl(bench / "questions.jsonl", [{"question_id": i, "image": f"{i % 2:03d}.jpg", "text": f"Describe {i}.",
                                             "category": ("conv", "detail", "complex")[i]} for i in range(3)])
    write_jsonl(bench / "context.jsonl", [{"id": f"c{i}", "image": f"{i:03d}.jpg", "caption": f"Picture {i}."}
                                          for i in range(2)])
    write_jsonl(bench / "answers_gpt4.jsonl", [{"question_id": i, "prompt": f"Describe {i}.", "text": f"It is {i}.",
                                                "answer_id": f"gpt4-{i}", "model_id": "gpt-4", "metadata": {}}
                                               for i in range(3)])

    mmvet = eval_dir / "mm-vet"
    mmvet_data = {}
    for i in range(2):
        image(mmvet / "images" / f"v1_{i}.png", i)
        mmvet_data[f"v1_{i}"] = {"imagename": f"v1_{i}.png", "capability": ["rec"] + (["ocr"] if i else []),
                                 "question": f"What is {i}?", "answer": f"thing {i}"}
    write_jsonl(mmvet / "llava-mm-vet.jsonl", [{"question_id": i, "image": f"v1_{i}.png", "text": f"What is {i}?"}
                                               for i in range(2)])
    write_json(mmvet / "mm-vet.json", mmvet_data)
    return eval_dir
