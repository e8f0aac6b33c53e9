"""TextVQA accuracy of an answers file, as the original's `eval_textvqa.py` computes it.

    python -m moellava.eval.eval_textvqa --annotation-file eval/textvqa/TextVQA_0.5.1_val.json \
        --result-file eval/textvqa/answers/CKPT.jsonl

Each answer is matched to its annotation by `(image_id, question)`: the answer's `question_id` (the image
id in LLaVA's question file) and the question read back from its `prompt` (lower-cased); the score is
the m4c soft accuracy of the EvalAI-normalised answer against the 10 human answers.
"""

import argparse
import os
import re
from typing import Optional

from moellava.eval.m4c_evaluator import TextVQAAccuracyEvaluator
from moellava.eval.records import EvalInputError, command_line, read_json, read_jsonl, write_score


def prompt_processor(prompt: str) -> Optional[str]:
    """The question inside an answers-file prompt (lower-cased), for the prompt layouts LLaVA used;
    None for any other layout (the official script stops there)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = match.group(1) if match else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    return question.lower() if question is not None else None


def eval_single(annotation_file: str, result_file: str) -> dict:
    data = read_json(annotation_file)
    if not isinstance(data, dict) or "data" not in data:
        raise EvalInputError(f"{annotation_file} has no 'data' list (TextVQA's annotation format).")
    annotations = {(a["image_id"], a["question"].lower()): a for a in data["data"]}
    pred_list = []
    for number, result in enumerate(read_jsonl(result_file, ("question_id", "prompt", "text")), start=1):
        question = prompt_processor(result["prompt"])
        if question is None:
            raise EvalInputError(
                f"{result_file} answer {number} (question_id {result['question_id']!r}): its prompt is in none of the "
                "layouts the official scorer reads (question + 'Reference OCR token: ...' + instruction on three "
                f"lines, question + instruction on two, or 'OCR tokens: ... Question: ... Short answer:'): "
                f"{result['prompt'][:200]!r}."
            )
        annotation = annotations.get((result["question_id"], question))
        if annotation is None:
            raise EvalInputError(
                f"{result_file} answer {number}: no annotation in {annotation_file} has image_id "
                f"{result['question_id']!r} and question {question!r}. Use the question file made for this "
                "annotation file (LLaVA's llava_textvqa_val_v051_ocr.jsonl for TextVQA_0.5.1_val.json)."
            )
        if len(annotation.get("answers", ())) != 10:
            raise EvalInputError(f"{annotation_file}: question_id {annotation.get('question_id')!r} has "
                                 f"{len(annotation.get('answers', ()))} answers; TextVQA's soft accuracy needs 10.")
        pred_list.append({"pred_answer": result["text"], "gt_answers": annotation["answers"]})
    if not pred_list:
        raise EvalInputError(f"{result_file} holds no answers.")
    accuracy = TextVQAAccuracyEvaluator().eval_pred_list(pred_list)
    return {"samples": len(pred_list), "accuracy": 100.0 * accuracy}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", required=True)
    parser.add_argument("--result-file", default=None)
    parser.add_argument("--result-dir", default=None, help="score every .jsonl answers file in this folder")
    parser.add_argument("--score-file", default=None, help="write the --result-file score here (JSON, for report)")
    return parser.parse_args(argv)


@command_line
def main(argv=None) -> None:
    args = parse_args(argv)
    files = [args.result_file] if args.result_file else []
    if args.result_dir:
        for name in sorted(os.listdir(args.result_dir)):
            if name.endswith(".jsonl"):
                files.append(os.path.join(args.result_dir, name))
            else:
                print(f"Skipping {name}")
    if not files:
        raise EvalInputError("Pass --result-file or --result-dir.")
    for number, path in enumerate(files):
        print(os.path.splitext(os.path.basename(path))[0])
        scores = eval_single(args.annotation_file, path)
        print(f"Samples: {scores['samples']}\nAccuracy: {scores['accuracy']:.2f}%\n")
        if number == 0 and args.result_file:
            write_score(args.score_file, "textvqa", scores, scores["accuracy"], result_file=path)


if __name__ == "__main__":
    main()
