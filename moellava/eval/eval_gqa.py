"""GQA scores of a predictions file, as the GQA evaluator that MoE-LLaVA ships (`eval_gqa.py`) computes them.

    python -m moellava.eval.eval_gqa --tier testdev_balanced --questions eval/gqa/data/testdev_balanced_questions.json \
        --predictions eval/gqa/data/testdev_balanced_predictions.json

Over the balanced questions: accuracy (and its binary / open split), validity and plausibility (0 without
a choices file, as on testdev), the answer-distribution chi-square, accuracy per structural and semantic
type, per number of reasoning steps and per question length; `--consistency` adds the entailed-question
consistency. `{tier}` in `--scenes`, `--choices` and `--predictions` is replaced by `--tier` (not in
`--questions`, as in the official script). Grounding needs attention maps, which LLaVA models do not
produce: `--grounding` is refused.
"""

import argparse
import glob
import os
from collections import defaultdict
from typing import Dict, List, Optional

from moellava.eval.records import EvalInputError, command_line, read_json, write_score

# Operations that do not count as a reasoning step (the final query).
NON_STEP_OPERATIONS = ("exist", "query: name", "choose name")
METRICS = ("binary", "open", "accuracy", "consistency", "validity", "plausibility", "grounding", "distribution")
DETAILED_METRICS = (
    ("accuracyPerStructuralType", "Accuracy / structural type"),
    ("accuracyPerSemanticType", "Accuracy / semantic type"),
    ("accuracyPerSteps", "Accuracy / steps number"),
    ("accuracyPerLength", "Accuracy / words number"),
)


def load_file(name: str):
    """A JSON file, or the chunks `<stem>/<stem>_*.<ext>` of one too big for a single file."""
    if os.path.isfile(name):
        return read_json(name)
    stem, _, ext = name.partition(".")
    if os.path.isdir(stem):
        data = {}
        for chunk in glob.glob(f"{stem}/{stem}_*.{ext.split('.')[0]}"):
            data.update(read_json(chunk))
        return data
    raise EvalInputError(f"Can't find {name}.")


def mean(values: List[float]) -> float:
    return float(sum(values)) / len(values) if values else 0


def steps_number(question: dict) -> int:
    return len([c for c in question["semantic"]
                if not any(o in f"{c['operation']}: {c['argument']}" for o in NON_STEP_OPERATIONS)])


def belongs(element: str, group: List[str], question: dict) -> bool:
    if "Common" in question["types"]["detailed"]:
        group = ["color", "material", "shape"]
    return element in group


def chi_square(gold: Dict[str, Dict[str, int]], predicted: Dict[str, Dict[str, int]]) -> float:
    """Chi-square of the predicted against the gold answer counts per question group, weighted by the group
    sizes."""
    total_score, total = 0.0, 0
    for group, answers in gold.items():
        score = sum((predicted[group].get(answer, 0) - expected) ** 2 / expected
                    for answer, expected in answers.items())
        overall = sum(answers.values())
        total_score += score * overall
        total += overall
    return total_score / total if total else 0.0


def eval_gqa(questions: Dict[str, dict], predictions: Dict[str, str], choices: Optional[Dict[str, dict]] = None,
             consistency: bool = False) -> dict:
    """The official scores, in percent (distribution: the chi-square / 100)."""
    for qid, question in questions.items():
        if qid not in predictions and (consistency or question["isBalanced"]):
            hint = ""
            if qid in {str(key) for key in predictions}:
                hint = " (the predictions have it as a number: GQA question ids are strings)"
            raise EvalInputError(f"no prediction for question {qid}{hint}. Please add prediction for all questions.")
    scores = {name: [] for name in METRICS}
    for name, _ in DETAILED_METRICS:
        scores[name] = defaultdict(list)
    gold_dist = defaultdict(lambda: defaultdict(int))
    predicted_dist = defaultdict(lambda: defaultdict(int))

    for qid, question in questions.items():
        if not question["isBalanced"]:
            continue
        gold, predicted = question["answer"], predictions[qid]
        correct = predicted == gold
        score = float(correct)
        scores["accuracy"].append(score)
        scores["accuracyPerLength"][len(question["question"].split())].append(score)
        scores["accuracyPerSteps"][steps_number(question)].append(score)
        scores["accuracyPerStructuralType"][question["types"]["structural"]].append(score)
        scores["accuracyPerSemanticType"][question["types"]["semantic"]].append(score)
        scores["open" if question["types"]["structural"] == "query" else "binary"].append(score)
        scores["validity"].append(float(belongs(predicted, choices[qid]["valid"], question) if choices else False))
        scores["plausibility"].append(
            float(belongs(predicted, choices[qid]["plausible"], question) if choices else False))
        group = question["groups"]["global"]
        if group is not None:
            gold_dist[group][gold] += 1
            predicted_dist[group][predicted] += 1
        if consistency:
            entailed = [eid for eid in question["entailed"] if eid != qid]
            if correct and entailed:
                scores["consistency"].append(mean([float(predictions[eid] == questions[eid]["answer"])
                                                   for eid in entailed]))

    scores["distribution"] = chi_square(gold_dist, predicted_dist) / 100
    for name in METRICS:
        if isinstance(scores[name], list):
            scores[name] = mean(scores[name]) * 100
    for name, _ in DETAILED_METRICS:
        scores[name] = {key: (mean(values) * 100, len(values)) for key, values in scores[name].items()}
    return scores


def print_scores(scores: dict, consistency: bool) -> None:
    print("")
    for name in METRICS:
        if name == "grounding" or (name == "consistency" and not consistency):
            continue
        suffix = " (lower is better)" if name == "distribution" else "%"
        print(f"{name.capitalize()}: {scores[name]:.2f}{suffix}")
    for name, title in DETAILED_METRICS:
        print("")
        print(f"{title}:")
        for key in sorted(scores[name]):
            value, amount = scores[name][key]
            print(f"  {key}: {value:.2f}% ({amount} questions)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="val", help="e.g. val, testdev_balanced")
    parser.add_argument("--scenes", default="{tier}_sceneGraphs.json", help="unused (grounding only)")
    parser.add_argument("--questions", default="{tier}_all_questions.json")
    parser.add_argument("--choices", default="{tier}_choices.json")
    parser.add_argument("--predictions", default="{tier}_predictions.json")
    parser.add_argument("--attentions", default="{tier}_attentions.json", help="unused (grounding only)")
    parser.add_argument("--consistency", action="store_true", help="needs predictions for every question")
    parser.add_argument("--grounding", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--objectFeatures", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mapSize", default=7, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--score-file", default=None, help="also write the scores here (JSON, for report)")
    return parser.parse_args(argv)


@command_line
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.grounding:
        raise EvalInputError("--grounding needs attention maps over the image, which LLaVA models do not produce.")
    questions = load_file(args.questions)
    choices_file = args.choices.format(tier=args.tier)
    choices = load_file(choices_file) if os.path.exists(choices_file) else None
    if choices is None:
        print(f"No choices file {choices_file}: validity and plausibility are 0 (as on testdev).")
    predictions_file = args.predictions.format(tier=args.tier)
    entries = load_file(predictions_file)
    predictions = {p["questionId"]: p["prediction"] for p in entries}
    scores = eval_gqa(questions, predictions, choices, args.consistency)
    print_scores(scores, args.consistency)
    write_score(args.score_file, "gqa", scores, scores["accuracy"], predictions=predictions_file)


if __name__ == "__main__":
    main()
