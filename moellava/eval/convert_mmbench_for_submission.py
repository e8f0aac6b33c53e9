"""MMBench submission (xlsx) from answers, as the original's `scripts/convert_mmbench_for_submission.py`:
the TSV without its hint, category, source, image, comment and l2-category columns, with a `prediction`
column inserted as the 7th, filled from the answers by `index` (with `--all-rounds` answers, the last round's
answer is the one kept, as in the original). Needs openpyxl (`pip install -e '.[eval]'`).

    python -m moellava.eval.convert_mmbench_for_submission --annotation-file eval/mmbench/mmbench_dev_20230712.tsv \
        --result-dir eval/mmbench/answers/mmbench_dev_20230712 --upload-dir eval/mmbench/answers_upload/mmbench_dev_20230712 \
        --experiment CKPT
"""

import argparse
import logging
import os

from moellava.eval.records import EvalInputError, command_line, read_jsonl, read_table, write_score

logger = logging.getLogger("moellava.eval")

DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
PREDICTION_POSITION = 6


def submission_table(columns, rows, answers):
    """`(header, rows)` of the submission sheet."""
    missing = [c for c in DROPPED_COLUMNS if c not in columns]
    if missing:
        raise EvalInputError(f"The annotation file lacks the column(s) {missing} the submission drops (it has "
                             f"{columns}); use MMBench's own TSV.")
    kept = [c for c in columns if c not in DROPPED_COLUMNS]
    header = kept[:PREDICTION_POSITION] + ["prediction"] + kept[PREDICTION_POSITION:]
    predictions = {}
    for answer in answers:
        predictions[answer["question_id"]] = answer["text"]
    unanswered = sum(1 for row in rows if row["index"] not in predictions)
    if unanswered:
        logger.warning("MMBench: %d of %d questions have no answer: their prediction cell stays empty.", unanswered,
                       len(rows))
    table = []
    for row in rows:
        values = {**row, "prediction": predictions.get(row["index"])}
        table.append([values[c] for c in header])
    return header, table


@command_line
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", required=True)
    parser.add_argument("--result-dir", required=True)
    parser.add_argument("--upload-dir", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--score-file", default=None, help="record the submission for report (JSON)")
    args = parser.parse_args(argv)
    try:
        from openpyxl import Workbook
    except ImportError:
        raise EvalInputError("The MMBench submission is an xlsx file: install openpyxl "
                             "(pip install -e '.[eval]').") from None
    columns, rows = read_table(args.annotation_file)
    if "index" not in columns:
        raise EvalInputError(f"{args.annotation_file} has no index column (it has {columns}).")
    result_file = os.path.join(args.result_dir, f"{args.experiment}.jsonl")
    header, table = submission_table(columns, rows, read_jsonl(result_file, ("question_id", "text")))
    workbook = Workbook()
    sheet = workbook.active
    sheet.append(header)
    for values in table:
        sheet.append(values)
    os.makedirs(args.upload_dir, exist_ok=True)
    upload = os.path.join(args.upload_dir, f"{args.experiment}.xlsx")
    workbook.save(upload)
    print(f"Submission for the MMBench server: {upload}")
    write_score(args.score_file, "mmbench", {"questions": len(rows)}, None, submission=upload)


if __name__ == "__main__":
    main()
