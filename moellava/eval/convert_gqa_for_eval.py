"""GQA predictions file from an answers file, as the original's `scripts/convert_gqa_for_eval.py`:
`[{"questionId", "prediction"}]` with each answer's trailing periods stripped and lower-cased.

    python -m moellava.eval.convert_gqa_for_eval --src eval/gqa/answers/.../merge.jsonl \
        --dst eval/gqa/data/testdev_balanced_predictions.json
"""

import argparse
from typing import List

from moellava.eval.records import command_line, read_jsonl, write_json


def convert(answers: List[dict]) -> List[dict]:
    return [{"questionId": a["question_id"], "prediction": a["text"].rstrip(".").lower()} for a in answers]


@command_line
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="answers file (jsonl)")
    parser.add_argument("--dst", required=True, help="predictions file (JSON) for eval_gqa")
    args = parser.parse_args(argv)
    write_json(args.dst, convert(read_jsonl(args.src, ("question_id", "text"))))


if __name__ == "__main__":
    main()
