"""Summary of GPT review files, as the original's `summarize_gpt_review.py`: per category (and "all"), the
relative score 100 x mean(answer 2) / mean(answer 1), then both mean scores x 10.

    python -m moellava.eval.summarize_gpt_review -f eval/llava-bench-in-the-wild/reviews/CKPT.jsonl

The LLaVA-Bench score is the "all" relative score (the model's answers against GPT-4's).
"""

import argparse
import os
from collections import defaultdict
from typing import Dict, List, Optional

from moellava.eval.records import EvalInputError, command_line, read_jsonl, write_score


def summarize(reviews: List[dict], ignore=()) -> Dict[str, List[float]]:
    """`{category: [relative score, mean score 1 x 10, mean score 2 x 10]}`, rounded as the original prints."""
    scores = defaultdict(list)
    for review in reviews:
        if review.get("question_id") in ignore:
            continue
        if "category" in review:
            scores[review["category"]].append(review["tuple"])
            scores["all"].append(review["tuple"])
        else:
            scores["all"].append(review["tuple"] if "tuple" in review else review["score"])
    summary = {}
    for category, values in sorted(scores.items()):
        first = sum(v[0] for v in values) / len(values)
        second = sum(v[1] for v in values) / len(values)
        if first == 0:
            raise EvalInputError(f"Reviews of {category!r} give the reference answers a mean score of 0.")
        summary[category] = [round(round(second, 3) / round(first, 3) * 100, 1), round(round(first, 3) * 10, 1),
                             round(round(second, 3) * 10, 1)]
    return summary


@command_line
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dir", default=None)
    parser.add_argument("-v", "--version", default=None)
    parser.add_argument("-s", "--select", nargs="*", default=None)
    parser.add_argument("-f", "--files", nargs="*", default=[])
    parser.add_argument("-i", "--ignore", nargs="*", default=[])
    parser.add_argument("--score-file", default=None, help="write the first file's summary here (JSON, for report)")
    args = parser.parse_args(argv)
    ignore = {int(x) for x in args.ignore}
    if args.files:
        review_files = args.files
    elif args.dir:
        review_files = [x for x in os.listdir(args.dir) if x.endswith(".jsonl") and (
            x.startswith(("gpt4_text", "reviews_", "review_")) or "review" in args.dir)]
    else:
        raise EvalInputError("Pass review files (-f) or a folder of them (-d).")
    first = True
    for review_file in sorted(review_files):
        config = os.path.basename(review_file).replace("gpt4_text_", "").replace(".jsonl", "")
        if args.select is not None and any(x not in config for x in args.select):
            continue
        version = "0613" if "0613" in config else "0314"
        if args.version is not None and args.version != version:
            continue
        print(config)
        summary = summarize(read_jsonl(os.path.join(args.dir, review_file) if args.dir else review_file), ignore)
        for category, values in summary.items():
            print(category, *values)
        print("=================================")
        if first:
            write_score(args.score_file, "llavabench", summary, summary["all"][0], reviews=review_file)
            first = False


if __name__ == "__main__":
    main()
