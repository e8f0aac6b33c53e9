"""VQAv2 test-server submission from merged answers, as the original's
`scripts/convert_vqav2_for_submission.py`: every question of `llava_vqav2_mscoco_test2015.jsonl` with its
EvalAI-normalised answer, "" for a question without an answer (with a warning and count).

    python -m moellava.eval.convert_vqav2_for_submission --dir eval/vqav2 --ckpt CKPT --split llava_vqav2_mscoco_test-dev2015
reads   <dir>/answers/<split>/<ckpt>/merge.jsonl and <dir>/llava_vqav2_mscoco_test2015.jsonl
writes  <dir>/answers_upload/<split>/<ckpt>.json  ([{"question_id", "answer"}])
"""

import argparse
import logging
import os

from moellava.eval.m4c_evaluator import EvalAIAnswerProcessor
from moellava.eval.records import command_line, read_answer_texts, read_jsonl, write_json, write_score

logger = logging.getLogger("moellava.eval")


@command_line
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="./playground/data/eval/vqav2")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("--score-file", default=None, help="record the submission for report (JSON)")
    args = parser.parse_args(argv)
    src = os.path.join(args.dir, "answers", args.split, args.ckpt, "merge.jsonl")
    test_split = os.path.join(args.dir, "llava_vqav2_mscoco_test2015.jsonl")
    dst = os.path.join(args.dir, "answers_upload", args.split, f"{args.ckpt}.json")

    results, error_lines = read_answer_texts(src)
    questions = read_jsonl(test_split, ("question_id",))
    print(f"total results: {len(results)}, total split: {len(questions)}, error_line: {error_lines}")
    processor = EvalAIAnswerProcessor()
    submission = [{"question_id": q["question_id"],
                   "answer": processor(results[q["question_id"]]) if q["question_id"] in results else ""}
                  for q in questions]
    unanswered = sum(1 for q in questions if q["question_id"] not in results)
    if unanswered:
        # Expected for test-dev answers (a subset of test2015); anything else is a missing chunk.
        logger.warning("VQAv2: %d of %d test2015 questions have no answer in %s: submitted as empty answers.",
                       unanswered, len(questions), src)
    write_json(dst, submission)
    print(f"Submission for the VQAv2 server: {dst}")
    write_score(args.score_file, "vqav2", {"answered": len(questions) - unanswered, "questions": len(questions)},
                None, submission=dst)


if __name__ == "__main__":
    main()
