"""MM-Vet results file from an answers file, as the original's `scripts/convert_mmvet_for_eval.py`:
`{"v1_<question_id>": answer}`, the format of MM-Vet's grader (its online evaluator, or `eval_gpt_mmvet`).

    python -m moellava.eval.convert_mmvet_for_eval --src eval/mm-vet/answers/CKPT.jsonl --dst eval/mm-vet/results/CKPT.json
"""

import argparse
from typing import Dict, List

from moellava.eval.records import command_line, read_jsonl, write_json


def convert(answers: List[dict]) -> Dict[str, str]:
    return {f"v1_{a['question_id']}": a["text"] for a in answers}


@command_line
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="answers file (jsonl)")
    parser.add_argument("--dst", required=True, help="results file (JSON)")
    args = parser.parse_args(argv)
    write_json(args.dst, convert(read_jsonl(args.src, ("question_id", "text"))), indent=2)


if __name__ == "__main__":
    main()
