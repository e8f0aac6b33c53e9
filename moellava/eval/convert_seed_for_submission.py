"""SEED-Bench accuracy and submission from merged answers, as the original's
`scripts/convert_seed_for_submission.py`: an answer is right when it is exactly the answer letter.

    python -m moellava.eval.convert_seed_for_submission --annotation-file eval/seed_bench/SEED-Bench.json \
        --result-file eval/seed_bench/answers/CKPT/merge.jsonl --result-upload-file eval/seed_bench/answers_upload/CKPT.jsonl

Prints the accuracy per question type and in total, then over the image and the video questions; writes
`{"question_id", "prediction"}` per question for the leaderboard. Question ids match as numbers or as
strings (the official accuracy looked them up as numbers only, scoring string ids as unanswered).
"""

import argparse
import logging
from typing import Dict, Optional

from moellava.eval.records import EvalInputError, command_line, read_json, read_jsonl, write_jsonl, write_score

logger = logging.getLogger("moellava.eval")


def result_for(results: Dict, question_id):
    """The answer to a SEED question id, which answers files hold as a number or as the string."""
    if question_id in results:
        return results[question_id]
    try:
        return results.get(int(question_id))
    except (TypeError, ValueError):
        return None


def accuracies(data: dict, results: Dict, only_type: Optional[str] = None) -> Dict:
    """`{"per_type": {type name: %}, "total": %}` over the questions of `only_type` ("image", "video") or all;
    total None when there are no such questions."""
    names = {type_id: name for name, type_id in data["question_type"].items()}
    counts, correct = {}, {}
    for question in data["questions"]:
        if only_type is not None and question["data_type"] != only_type:
            continue
        type_id = question["question_type_id"]
        counts[type_id] = counts.get(type_id, 0) + 1
        row = result_for(results, question["question_id"])
        correct[type_id] = correct.get(type_id, 0) + int(row is not None and row["text"] == question["answer"])
    per_type = {names.get(t, str(t)): correct[t] / counts[t] * 100 for t in sorted(counts)}
    total = sum(correct.values()) / sum(counts.values()) * 100 if counts else None
    return {"per_type": per_type, "total": total}


@command_line
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", required=True)
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--result-upload-file", required=True)
    parser.add_argument("--score-file", default=None, help="also write the scores here (JSON, for report)")
    args = parser.parse_args(argv)
    data = read_json(args.annotation_file)
    if not isinstance(data, dict) or "questions" not in data or "question_type" not in data:
        raise EvalInputError(f"{args.annotation_file} lacks 'questions' / 'question_type' (SEED-Bench.json format).")
    results = {row["question_id"]: row for row in read_jsonl(args.result_file, ("question_id", "text"))}
    missing = [q["question_id"] for q in data["questions"] if result_for(results, q["question_id"]) is None]
    if missing:
        logger.warning("SEED-Bench: %d of %d questions have no answer in %s (counted wrong, left out of the "
                       "submission), e.g. %r.", len(missing), len(data["questions"]), args.result_file, missing[0])
    overall = accuracies(data, results)
    for name, accuracy in overall["per_type"].items():
        print(f"{name}: {accuracy:.2f}%")
    print(f"Total accuracy: {overall['total']:.2f}%")
    by_type = {}
    for data_type in ("image", "video"):
        by_type[data_type] = accuracies(data, results, data_type)["total"]
        if by_type[data_type] is None:
            print(f"{data_type} accuracy: n/a (no {data_type} question)")
        else:
            print(f"{data_type} accuracy: {by_type[data_type]:.2f}%")
    write_jsonl(args.result_upload_file, [
        {"question_id": q["question_id"], "prediction": result_for(results, q["question_id"])["text"]}
        for q in data["questions"] if result_for(results, q["question_id"]) is not None])
    metrics = {"per_type": overall["per_type"], "total": overall["total"], "image": by_type["image"],
               "video": by_type["video"], "unanswered": len(missing)}
    write_score(args.score_file, "seed", metrics, by_type["image"], submission=args.result_upload_file)


if __name__ == "__main__":
    main()
