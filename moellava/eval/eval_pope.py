"""POPE scores of an answers file, as the original's `eval_pope.py` computes them, per category.

    python -m moellava.eval.eval_pope --annotation-dir eval/pope/coco --question-file eval/pope/llava_pope_test.jsonl \
        --result-file eval/pope/answers/CKPT.jsonl

For each `coco_pope_<category>.json` label file, the answers of that category (the question file says which)
are read as yes/no the official way: only the first sentence counts, commas are dropped, and the answer is
"no" exactly when one of its space-separated words is `No`, `no` or `not`, otherwise "yes" (so "NO", "No!"
and an empty answer count as yes). Answers are paired with labels **by position**, as the official script
does. Both fragilities are reported loudly, with counts, while the official numbers stay the reported ones.
Categories are scored in sorted order (the official order is the directory listing's).
"""

import argparse
import logging
import os
import string
from typing import Dict, List, Optional

from moellava.eval.records import EvalInputError, command_line, read_jsonl, write_score

logger = logging.getLogger("moellava.eval")


def first_sentence(text: str) -> str:
    return text.split(".")[0] if "." in text else text


def parse_yes_no(text: str) -> str:
    """'yes' or 'no', as the official parser reads an answer."""
    words = first_sentence(text).replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def says_yes(text: str) -> bool:
    """Whether the first sentence has the word yes (any case, punctuation aside)."""
    return "yes" in (word.strip(string.punctuation).lower() for word in first_sentence(text).split())


def pope_metrics(predictions: List[str], labels: List[str]) -> Dict[str, float]:
    """TP/FP/TN/FN, accuracy, precision, recall, F1 and yes ratio of yes/no predictions paired with labels by
    position (as the official zip: extra entries on either side are not scored). A ratio whose denominator is
    0 (where the official script stops with ZeroDivisionError) is 0, with a warning."""
    predicted = [0 if p == "no" else 1 for p in predictions]
    truth = [0 if label == "no" else 1 for label in labels]
    counts = {"TP": 0, "FP": 0, "TN": 0, "FN": 0}
    for pred, label in zip(predicted, truth):
        counts[("T" if pred == label else "F") + ("P" if pred == 1 else "N")] += 1
    tp, fp, tn, fn = counts["TP"], counts["FP"], counts["TN"], counts["FN"]

    def ratio(numerator: float, denominator: float, name: str) -> float:
        if denominator == 0:
            logger.warning("POPE %s is undefined (0/0; the official script stops here): reported as 0.", name)
            return 0.0
        return numerator / denominator

    precision = ratio(tp, tp + fp, "precision (no 'yes' prediction)")
    recall = ratio(tp, tp + fn, "recall (no 'yes' label)")
    return {
        **counts,
        "accuracy": ratio(tp + tn, tp + tn + fp + fn, "accuracy"),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall, "F1"),
        "yes_ratio": ratio(predicted.count(1), len(predicted), "yes ratio"),
    }


def eval_category(category: str, answers: List[dict], labels: List[dict], questions: Dict) -> Dict[str, float]:
    """Scores of one category, with the warnings the official script would not give."""
    predictions = [parse_yes_no(answer["text"]) for answer in answers]
    unclear = sum(1 for answer, pred in zip(answers, predictions) if pred == "yes" and not says_yes(answer["text"]))
    if unclear:
        logger.warning("POPE %s: %d answer(s) say neither 'yes' nor one of 'No'/'no'/'not' (e.g. empty, 'NO', "
                       "'No!'); the official parser counts them as yes.", category, unclear)
    if len(answers) != len(labels):
        logger.warning("POPE %s: %d answers for %d labels; answers and labels are paired by position, so only the "
                       "first %d are scored.", category, len(answers), len(labels), min(len(answers), len(labels)))
    out_of_order = 0
    for answer, label in zip(answers, labels):
        question = questions[answer["question_id"]]
        if "image" in label and "text" in label and (
                question.get("image") != label["image"] or not question.get("text", "").startswith(label["text"])):
            out_of_order += 1
    if out_of_order:
        logger.warning("POPE %s: %d answer(s) are not about the question of the label at the same position (the "
                       "answers file order differs from the label file); the official score pairs them anyway.",
                       category, out_of_order)
    metrics = pope_metrics(predictions, [label["label"] for label in labels])
    metrics.update(samples=len(answers), unclear_answers=unclear, out_of_order=out_of_order)
    return metrics


def eval_pope(annotation_dir: str, question_file: str, result_file: str) -> Dict[str, Dict[str, float]]:
    """Scores per category (as printed by `main`)."""
    questions = {q["question_id"]: q for q in read_jsonl(question_file, ("question_id", "category"))}
    answers = read_jsonl(result_file, ("question_id", "text"))
    for number, answer in enumerate(answers, start=1):
        if answer["question_id"] not in questions:
            raise EvalInputError(f"{result_file} answer {number}: question_id {answer['question_id']!r} is not in "
                                 f"{question_file}. Score the answers with the question file they answer.")
    if not os.path.isdir(annotation_dir):
        raise EvalInputError(f"--annotation-dir {annotation_dir} is not a folder (POPE's coco/ label files).")
    results = {}
    for name in sorted(os.listdir(annotation_dir)):
        if not (name.startswith("coco_pope_") and name.endswith(".json")):
            raise EvalInputError(f"{annotation_dir}/{name} is not a coco_pope_<category>.json label file; the folder "
                                 "must hold only those.")
        category = name[len("coco_pope_"):-len(".json")]
        labels = read_jsonl(os.path.join(annotation_dir, name), ("label",))
        category_answers = [a for a in answers if questions[a["question_id"]]["category"] == category]
        if not category_answers:
            logger.warning("POPE %s: no answers in %s; category not scored.", category, result_file)
            continue
        results[category] = eval_category(category, category_answers, labels, questions)
    if not results:
        raise EvalInputError(f"No POPE category of {annotation_dir} has answers in {result_file}.")
    return results


def print_category(category: str, m: Dict[str, float]) -> None:
    print(f"Category: {category}, # samples: {m['samples']}")
    print("TP\tFP\tTN\tFN\t")
    print(f"{m['TP']}\t{m['FP']}\t{m['TN']}\t{m['FN']}")
    print(f"Accuracy: {m['accuracy']}")
    print(f"Precision: {m['precision']}")
    print(f"Recall: {m['recall']}")
    print(f"F1 score: {m['f1']}")
    print(f"Yes ratio: {m['yes_ratio']}")
    print("%.3f, %.3f, %.3f, %.3f, %.3f" % (m["f1"], m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]))
    print("====================================")


def summary(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Means over the categories, in percent: F1 (the README table's POPE column) and accuracy."""
    return {key: 100.0 * sum(m[key] for m in results.values()) / len(results) for key in ("f1", "accuracy")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-dir", required=True)
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--score-file", default=None, help="also write the scores here (JSON, for report)")
    return parser.parse_args(argv)


@command_line
def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    results = eval_pope(args.annotation_dir, args.question_file, args.result_file)
    for category, metrics in results.items():
        print_category(category, metrics)
    means = summary(results)
    print(f"Mean over {len(results)} categories: F1 {means['f1']:.1f}, accuracy {means['accuracy']:.1f}")
    write_score(args.score_file, "pope", {"categories": results, **means}, means["f1"], result_file=args.result_file)


if __name__ == "__main__":
    main()
