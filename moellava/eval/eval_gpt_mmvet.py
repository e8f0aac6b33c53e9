"""MM-Vet grading as the original's `eval_gpt_mmvet.py` (MM-Vet's own grader) does it, without the network:
the GPT grader is not called here.

    # 1. grading requests (the grader's few-shot prompt per question) -> <result_path>/<ckpt>_<judge>-grade-requests.jsonl
    python -m moellava.eval.eval_gpt_mmvet --mmvet_path eval/mm-vet --ckpt_name CKPT --result_path eval/mm-vet/results
    # 2. send them to the grader yourself; save its replies as jsonl {"id": <question id, e.g. v1_0>, "content": <reply>}
    # 3. the same command with --responses replies.jsonl writes the official grade file and the scores; a grade file
    #    <ckpt>_<judge>-grade-1runs.json from MM-Vet's own grader is scored the same way

A reply's score is its first word as a number in [0, 1]; the original asks again (up to 5 times) when it is
not, then gives 0.0: here such replies score 0.0 with a warning and a count. Scores: per capability and in
total, the summed scores over the questions x 100 / their number, and per capability combination
(one run). Columns are ordered by question count, ties by first appearance, and the capabilities in a
combination's name sorted (the original's set order varied between runs).
"""

import argparse
import csv
import logging
import os
from typing import Dict, List, Optional

from moellava.eval.records import EvalInputError, command_line, read_json, read_jsonl, write_json, write_jsonl, \
    write_score

logger = logging.getLogger("moellava.eval")

JUDGE = "gpt-4-0613"
DECIMALS = 1
# MM-Vet's grading prompt (its official few-shot examples).
PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""


def grading_question(item: dict, prediction: str) -> str:
    answer = item["answer"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return PROMPT + "\n" + " | ".join([item["question"], answer, prediction, ""])


def parse_grade(content: str) -> Optional[float]:
    """The score a grader reply gives (its first word, a number in [0, 1]), or None."""
    try:
        score = float(content.split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def grading_requests(data: Dict[str, dict], results: Dict[str, str], judge: str = JUDGE) -> List[dict]:
    missing = [qid for qid in data if qid not in results]
    if missing:
        raise EvalInputError(f"{len(missing)} MM-Vet question(s) have no answer in the results, e.g. {missing[0]}.")
    return [{"id": qid, "model": judge, "max_tokens": 3, "temperature": 0.0,
             "messages": [{"role": "user", "content": grading_question(item, results[qid])}]}
            for qid, item in data.items()]


def grades_from_responses(responses: List[dict], judge: str = JUDGE) -> Dict[str, dict]:
    """The official grade file `{id: {"model": [..], "content": [..], "score": [..]}}` (one run)."""
    grades, unparsed = {}, 0
    for response in responses:
        score = parse_grade(response["content"])
        unparsed += score is None
        grades[response["id"]] = {"model": [judge], "content": [response["content"]],
                                  "score": [0.0 if score is None else score]}
    if unparsed:
        logger.warning("MM-Vet: %d grader repl(ies) are not a score in [0, 1]: scored 0.0 (the original asks again "
                       "up to 5 times before giving 0.0).", unparsed)
    return grades


def capability_scores(data: Dict[str, dict], grades: Dict[str, dict]):
    """`(per capability + total, per capability combination + total)`, in percent, rounded as the original."""
    missing = [qid for qid in data if qid not in grades]
    if missing:
        raise EvalInputError(f"{len(missing)} MM-Vet question(s) have no grade, e.g. {missing[0]}.")
    order = {}
    combinations = {}
    for item in data.values():
        for capability in sorted(item["capability"]):
            order.setdefault(capability, len(order))
        combinations.setdefault("_".join(sorted(set(item["capability"]))), len(combinations))
    totals = {c: [0.0, 0] for c in order}
    combination_totals = {c: [0.0, 0] for c in combinations}
    grand_total = 0.0
    for qid, item in data.items():
        score = grades[qid]["score"][0]
        for capability in set(item["capability"]):
            totals[capability][0] += score
            totals[capability][1] += 1
        name = "_".join(sorted(set(item["capability"])))
        combination_totals[name][0] += score
        combination_totals[name][1] += 1
        grand_total += score

    def table(sums, first_seen):
        names = sorted(sums, key=lambda n: (-sums[n][1], first_seen[n]))
        row = {n: round(sums[n][0] / sums[n][1] * 100, DECIMALS) for n in names}
        row["total"] = round(grand_total / len(data) * 100, DECIMALS)
        return row

    return table(totals, order), table(combination_totals, combinations)


def write_csv(path: str, model: str, row: Dict[str, float]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([""] + list(row) + ["std", "runs"])
        writer.writerow([model] + list(row.values()) + [0.0, f"[{row['total']}]"])


@command_line
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mmvet_path", required=True, help="folder with mm-vet.json")
    parser.add_argument("--ckpt_name", required=True)
    parser.add_argument("--result_path", required=True, help="folder with <ckpt_name>.json (convert_mmvet_for_eval)")
    parser.add_argument("--judge", default=JUDGE, help="the grader model")
    parser.add_argument("--responses", default=None, help="the grader's replies (jsonl {id, content})")
    parser.add_argument("--score-file", default=None, help="also write the scores here (JSON, for report)")
    args = parser.parse_args(argv)
    data = read_json(os.path.join(args.mmvet_path, "mm-vet.json"))
    results = read_json(os.path.join(args.result_path, f"{args.ckpt_name}.json"))
    prefix = os.path.join(args.result_path, f"{args.ckpt_name}_{args.judge}")
    requests_file = f"{prefix}-grade-requests.jsonl"
    write_jsonl(requests_file, grading_requests(data, results, args.judge))
    print(f"{len(data)} grading requests for {args.judge}: {requests_file}")
    grade_file = f"{prefix}-grade-1runs.json"
    if args.responses is not None:
        responses = read_jsonl(args.responses, ("id", "content"))
        write_json(grade_file, grades_from_responses(responses, args.judge), indent=4)
    if not os.path.exists(grade_file):
        print("No grader is called here (no network): send the requests, save the replies as jsonl "
              "{\"id\", \"content\"} and rerun with --responses.")
        return
    capabilities, combinations = capability_scores(data, read_json(grade_file))
    write_csv(f"{prefix}-cap-score-1runs.csv", args.ckpt_name, capabilities)
    write_csv(f"{prefix}-cap-int-score-1runs.csv", args.ckpt_name, combinations)
    for row in (capabilities, combinations):
        print("  ".join(f"{name}: {value}" for name, value in row.items()))
    write_score(args.score_file, "mmvet", {"capabilities": capabilities, "combinations": combinations},
                capabilities["total"], grades=grade_file)


if __name__ == "__main__":
    main()
