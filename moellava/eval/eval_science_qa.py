"""ScienceQA accuracy of an answers file, as the original's `eval_science_qa.py` computes it, plus the
per-category accuracies of ScienceQA's own `evaluate_acc.py` (subject, context, grade).

    python -m moellava.eval.eval_science_qa --base-dir eval/scienceqa --result-file eval/scienceqa/answers/CKPT.jsonl \
        --output-file eval/scienceqa/answers/CKPT_output.jsonl --output-result eval/scienceqa/answers/CKPT_result.json

An answer counts as option X when it is exactly "X", starts with "X. ", or contains exactly one
"The answer is X" followed by any character; anything else (e.g. "A.", "(A)", "a") is FAILED and wrong.
IMG-Accuracy is over the answers whose prompt has `<image>`; a question without an answer counts wrong.
"""

import argparse
import logging
import os
import re
from typing import Dict, List, Optional, Sequence

from moellava.eval.records import EvalInputError, command_line, read_json, read_jsonl, write_json, write_score

logger = logging.getLogger("moellava.eval")

OPTIONS = ["A", "B", "C", "D", "E"]
THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
# Spellings of a bare option letter that the official parser rejects: counted, for the warning only.
LOOKS_LIKE_A_LETTER = re.compile(r"^\s*[\(\[]?\s*([A-Ea-e])\s*[\)\]\.:,]?\s*$")
GRADES_1_6 = {f"grade{i}" for i in range(1, 7)}
GRADES_7_12 = {f"grade{i}" for i in range(7, 13)}


def parse_answer(text: str, options: Sequence[str] = OPTIONS) -> str:
    """The option letter an answer gives, or "FAILED"."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def get_pred_idx(prediction: str, choices: Sequence[str], options: Sequence[str] = OPTIONS) -> int:
    """The index of the chosen option, or -1 (no valid choice)."""
    return options.index(prediction) if prediction in options[:len(choices)] else -1


def category_accuracies(problems: Dict[str, dict], results: Dict[str, int]) -> Dict[str, float]:
    """ScienceQA's evaluate_acc categories over the scored problems, in percent."""
    groups = {
        "natural": lambda p: p.get("subject") == "natural science",
        "social": lambda p: p.get("subject") == "social science",
        "language": lambda p: p.get("subject") == "language science",
        "has_text": lambda p: bool(p.get("hint")),
        "has_image": lambda p: bool(p.get("image")),
        "no_context": lambda p: not p.get("hint") and not p.get("image"),
        "grade_1_6": lambda p: p.get("grade") in GRADES_1_6,
        "grade_7_12": lambda p: p.get("grade") in GRADES_7_12,
    }
    accuracies = {}
    for name, belongs in groups.items():
        members = [pid for pid, problem in problems.items() if belongs(problem)]
        if members:
            accuracies[name] = 100.0 * sum(results[pid] == problems[pid]["answer"] for pid in members) / len(members)
    return accuracies


def eval_science_qa(base_dir: str, result_file: str, split: str = "test", options: Sequence[str] = OPTIONS):
    """`(results, sqa_results, scores)`: the two files the official script writes, and the scores."""
    splits = read_json(os.path.join(base_dir, "pid_splits.json"))
    if split not in splits:
        raise EvalInputError(f"{base_dir}/pid_splits.json has no split {split!r} (it has {sorted(splits)}).")
    problems = read_json(os.path.join(base_dir, "problems.json"))
    missing = [pid for pid in splits[split] if pid not in problems]
    if missing:
        raise EvalInputError(f"{base_dir}/problems.json lacks {len(missing)} problem(s) of split {split}, "
                             f"e.g. {missing[0]}.")
    predictions = {pred["question_id"]: pred for pred in read_jsonl(result_file, ("question_id", "prompt", "text"))}
    split_problems = {pid: problems[pid] for pid in splits[split]}

    results = {"correct": [], "incorrect": []}
    sqa_results = {"acc": None, "correct": None, "count": None, "results": {}, "outputs": {}}
    unanswered = failed = letter_like = 0
    for pid, problem in split_problems.items():
        if pid in predictions:
            pred = predictions[pid]
            text = pred["text"]
        else:
            unanswered += 1
            pred, text = {"text": "FAILED", "prompt": "Unknown"}, "FAILED"
        answer = parse_answer(text, options)
        if answer == "FAILED" and pid in predictions:
            failed += 1
            letter_like += bool(LOOKS_LIKE_A_LETTER.match(text))
        pred_idx = get_pred_idx(answer, problem["choices"], options)
        analysis = {
            "question_id": pid,
            "parsed_ans": answer,
            "ground_truth": options[problem["answer"]],
            "question": pred["prompt"],
            "pred": text,
            "is_multimodal": "<image>" in pred["prompt"],
        }
        sqa_results["results"][pid] = pred_idx
        sqa_results["outputs"][pid] = text
        results["correct" if pred_idx == problem["answer"] else "incorrect"].append(analysis)

    correct, total = len(results["correct"]), len(results["correct"]) + len(results["incorrect"])
    if total == 0:
        raise EvalInputError(f"Split {split} of {base_dir}/pid_splits.json is empty.")
    img_correct = sum(1 for x in results["correct"] if x["is_multimodal"])
    img_total = img_correct + sum(1 for x in results["incorrect"] if x["is_multimodal"])
    sqa_results.update(acc=correct / total * 100, correct=correct, count=total)
    if unanswered:
        logger.warning("ScienceQA: %d of %d questions have no answer in %s; counted wrong.", unanswered, total,
                       result_file)
    if failed:
        logger.warning("ScienceQA: %d answer(s) did not parse (%d of them look like an option letter the official "
                       "parser rejects, e.g. 'A.', '(A)', 'a'); counted wrong.", failed, letter_like)
    scores = {
        "total": total,
        "correct": correct,
        "accuracy": correct / total * 100,
        "img_accuracy": img_correct / img_total * 100 if img_total else None,
        "img_total": img_total,
        "categories": category_accuracies(split_problems, sqa_results["results"]),
        "unanswered": unanswered,
        "unparsed": failed,
    }
    return results, sqa_results, scores


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dir", required=True, help="folder with pid_splits.json and problems.json")
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--output-file", required=True, help="the correct/incorrect analysis (JSON)")
    parser.add_argument("--output-result", required=True, help="accuracy, parsed choices and outputs (JSON)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--options", nargs="+", default=OPTIONS)
    parser.add_argument("--score-file", default=None, help="also write the scores here (JSON, for report)")
    return parser.parse_args(argv)


@command_line
def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    results, sqa_results, scores = eval_science_qa(args.base_dir, args.result_file, args.split, args.options)
    img = f"{scores['img_accuracy']:.2f}%" if scores["img_accuracy"] is not None else "n/a (no image question)"
    print(f"Total: {scores['total']}, Correct: {scores['correct']}, Accuracy: {scores['accuracy']:.2f}%, "
          f"IMG-Accuracy: {img}")
    print("  ".join(f"{name}: {value:.2f}" for name, value in scores["categories"].items()))
    write_json(args.output_file, results, indent=2)
    write_json(args.output_result, sqa_results, indent=2)
    write_score(args.score_file, "scienceqa", scores, scores["img_accuracy"], result_file=args.result_file)


if __name__ == "__main__":
    main()
