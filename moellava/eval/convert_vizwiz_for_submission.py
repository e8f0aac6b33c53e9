"""VizWiz test-server submission from answers, as the original's `scripts/convert_vizwiz_for_submission.py`:
`[{"image", "answer"}]` with EvalAI-normalised answers, for every question of the annotation file (each
must have an answer).

    python -m moellava.eval.convert_vizwiz_for_submission --annotation-file eval/vizwiz/llava_test.jsonl \
        --result-file eval/vizwiz/answers/CKPT.jsonl --result-upload-file eval/vizwiz/answers_upload/CKPT.json
"""

import argparse

from moellava.eval.m4c_evaluator import EvalAIAnswerProcessor
from moellava.eval.records import EvalInputError, command_line, read_answer_texts, read_jsonl, write_json, write_score


@command_line
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", required=True)
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--result-upload-file", required=True)
    parser.add_argument("--score-file", default=None, help="record the submission for report (JSON)")
    args = parser.parse_args(argv)
    results, error_lines = read_answer_texts(args.result_file)
    questions = read_jsonl(args.annotation_file, ("question_id", "image"))
    print(f"total results: {len(results)}, total split: {len(questions)}, error_line: {error_lines}")
    unanswered = [q["question_id"] for q in questions if q["question_id"] not in results]
    if unanswered:
        raise EvalInputError(f"{len(unanswered)} question(s) of {args.annotation_file} have no answer in "
                             f"{args.result_file}, e.g. {unanswered[0]!r}: answer every question first.")
    processor = EvalAIAnswerProcessor()
    write_json(args.result_upload_file,
               [{"image": q["image"], "answer": processor(results[q["question_id"]])} for q in questions])
    print(f"Submission for the VizWiz server: {args.result_upload_file}")
    write_score(args.score_file, "vizwiz", {"questions": len(questions)}, None, submission=args.result_upload_file)


if __name__ == "__main__":
    main()
