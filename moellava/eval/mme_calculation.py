"""MME scores of the result files of `convert_answer_to_mme`, as MME's official `calculation.py`.

    python -m moellava.eval.mme_calculation --results_dir eval/MME/eval_tool/answers/CKPT

Each task file has two lines per image. An answer is "yes"/"no" when it is exactly that, else when its
first four characters contain "yes" (checked first) or "no", else "other" (wrong). A task's score is
100 x accuracy + 100 x accuracy+ (the fraction of images with both answers right); Perception (10 tasks,
at most 2000) and Cognition (4 tasks, at most 800) are the sums.
"""

import argparse
import logging
import os
from typing import Dict, List

from moellava.eval.records import EvalInputError, command_line, write_score

logger = logging.getLogger("moellava.eval")

EVAL_TYPES = {
    "Perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                   "OCR"],
    "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}


def parse_pred_ans(pred_ans: str) -> str:
    if pred_ans in ("yes", "no"):
        return pred_ans
    prefix = pred_ans[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def task_scores(path: str) -> Dict[str, float]:
    """accuracy, accuracy+, score (both x 100, summed) and the counts behind them, for one task file."""
    if not os.path.isfile(path):
        raise EvalInputError(f"{path} does not exist: every MME task needs its result file (run "
                             "convert_answer_to_mme on the answers to the whole benchmark).")
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if len(lines) % 2:
        raise EvalInputError(f"{path} has {len(lines)} lines; MME asks two questions per image (an answer with a "
                             "newline breaks a line in two).")
    gts, preds = [], []
    both_right = other = unreadable = mismatched = 0
    for start in range(0, len(lines), 2):
        right = 0
        images = set()
        for line in lines[start:start + 2]:
            parts = line.split("\t")
            if len(parts) != 4:
                unreadable += 1  # the official script prints the line and skips it
                continue
            image, _, gt_ans, pred_ans = parts
            images.add(image)
            gt_ans, pred_ans = gt_ans.lower(), parse_pred_ans(pred_ans.lower())
            if gt_ans not in ("yes", "no"):
                raise EvalInputError(f"{path}: ground truth {gt_ans!r} for {image} is not yes or no.")
            gts.append(gt_ans)
            preds.append(pred_ans)
            right += gt_ans == pred_ans
            other += pred_ans == "other"
        both_right += right == 2
        mismatched += len(images) > 1
    name = os.path.basename(path)
    if unreadable:
        logger.warning("MME %s: %d line(s) are not image<TAB>question<TAB>truth<TAB>answer (an answer with a tab?); "
                       "skipped, as the official script does.", name, unreadable)
    if mismatched:
        logger.warning("MME %s: %d line pair(s) are about two different images (the answers are not in the question "
                       "file's order); accuracy+ pairs them anyway, as the official script does.", name, mismatched)
    accuracy = sum(g == p for g, p in zip(gts, preds)) / len(gts) if gts else 0.0
    accuracy_plus = both_right / (len(lines) // 2) if lines else 0.0
    return {"acc": accuracy, "acc_plus": accuracy_plus, "score": accuracy * 100 + accuracy_plus * 100,
            "images": len(lines) // 2, "other": other}


def process_result(results_dir: str) -> Dict[str, Dict]:
    """`{eval type: {"total": score, "tasks": {task: scores}}}`."""
    results = {}
    for eval_type, tasks in EVAL_TYPES.items():
        per_task = {task: task_scores(os.path.join(results_dir, f"{task}.txt")) for task in tasks}
        results[eval_type] = {"total": sum(t["score"] for t in per_task.values()), "tasks": per_task}
        others = sum(t["other"] for t in per_task.values())
        if others:
            logger.warning("MME %s: %d answer(s) are neither yes nor no at their start; counted wrong.", eval_type,
                           others)
    return results


@command_line
def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", required=True)
    parser.add_argument("--score-file", default=None, help="also write the scores here (JSON, for report)")
    args = parser.parse_args(argv)
    results = process_result(args.results_dir)
    for eval_type, result in results.items():
        print("===========", eval_type, "===========")
        print("total score:", result["total"], "\n")
        for task, scores in result["tasks"].items():
            print("\t", task, " score:", scores["score"])
        print("\n")
    write_score(args.score_file, "mme", results, results["Perception"]["total"],
                cognition=results["Cognition"]["total"], results_dir=args.results_dir)


if __name__ == "__main__":
    main()
