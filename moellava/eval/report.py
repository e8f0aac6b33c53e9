"""One table of every benchmark scored so far, one row per checkpoint, in the columns of MoE-LLaVA's
README table (then MMBench-CN, SEED-IMG and LLaVA-Bench), as Markdown and JSON.

    python -m moellava.eval.report --answers-dir eval/scores/CKPT [eval/scores/OTHER ...] \
        [--server-score vqav2=77.6 --server-score mmbench=65.2] [--json report.json] [--markdown report.md]

Each `scripts/eval/<bench>.sh` leaves `eval/scores/<CKPT_NAME>/<bench>.json` (the scorers' `--score-file`).
VQAv2, VizWiz and MMBench are scored by their servers: their cells say "server" until `--server-score`
gives the server's number. Avg is the mean of the README's columns other than MME, as in the README,
shown when all eight are known.
"""

import argparse
import json
import os
from typing import Dict, List, Optional

from moellava.eval.records import EvalInputError, command_line, read_json, write_json

# (column, score file stem, what the number is)
COLUMNS = (
    ("VQAv2", "vqav2", "test-dev accuracy (server)"),
    ("GQA", "gqa", "testdev-balanced accuracy"),
    ("VizWiz", "vizwiz", "test accuracy (server)"),
    ("SQA-IMG", "sqa", "ScienceQA accuracy on image questions"),
    ("T-VQA", "textvqa", "TextVQA val accuracy"),
    ("POPE", "pope", "F1, mean over the categories"),
    ("MME", "mme", "Perception score"),
    ("MM-Bench", "mmbench", "dev accuracy (server)"),
    ("MM-Vet", "mmvet", "GPT-graded total"),
    ("MMBench-CN", "mmbench_cn", "dev accuracy (server)"),
    ("SEED-IMG", "seed", "accuracy on image questions"),
    ("LLaVA-Bench", "llavabench", "GPT-reviewed relative score"),
)
AVERAGED = ("vqav2", "gqa", "vizwiz", "sqa", "textvqa", "pope", "mmbench", "mmvet")


def parse_server_scores(pairs: List[str]) -> Dict[str, float]:
    known = {stem for _, stem, _ in COLUMNS}
    scores = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in known:
            raise EvalInputError(f"--server-score {pair!r}: {name!r} is not one of {sorted(known)}.")
        try:
            scores[name] = float(value)
        except ValueError:
            raise EvalInputError(f"--server-score {pair!r}: {value!r} is not a number.") from None
    return scores


def checkpoint_row(scores_dir: str, server_scores: Dict[str, float]) -> dict:
    """`{"checkpoint", "scores": {stem: number or None}, "files": {stem: score file}}` for one folder."""
    if not os.path.isdir(scores_dir):
        raise EvalInputError(f"{scores_dir} is not a folder of score files (scripts/eval/*.sh write "
                             "eval/scores/<CKPT_NAME>/<bench>.json).")
    scores: Dict[str, Optional[float]] = {}
    files = {}
    for name in sorted(os.listdir(scores_dir)):
        stem, ext = os.path.splitext(name)
        if ext == ".json":
            path = os.path.join(scores_dir, name)
            scores[stem] = read_json(path).get("headline")
            files[stem] = path
    scores.update(server_scores)
    values = [scores.get(stem) for stem in AVERAGED]
    average = sum(values) / len(values) if all(v is not None for v in values) else None
    return {"checkpoint": os.path.basename(os.path.normpath(scores_dir)), "average": average, "scores": scores,
            "files": files}


def cell(row: dict, stem: str) -> str:
    if stem not in row["scores"]:
        return "–"
    value = row["scores"][stem]
    return "server" if value is None else f"{value:.1f}"


def markdown(rows: List[dict]) -> str:
    header = ["Checkpoint", "Avg"] + [column for column, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        average = "–" if row["average"] is None else f"{row['average']:.1f}"
        lines.append("| " + " | ".join([row["checkpoint"], average] + [cell(row, stem) for _, stem, _ in COLUMNS])
                     + " |")
    return "\n".join(lines)


@command_line
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores-dir", "--answers-dir", dest="scores_dirs", nargs="+", required=True,
                        help="one folder of score files per checkpoint (eval/scores/<CKPT_NAME>)")
    parser.add_argument("--server-score", action="append", default=[], metavar="BENCH=VALUE",
                        help="a server's score, e.g. vqav2=77.6 (applies to every row)")
    parser.add_argument("--json", default=None, help="also write the table here (JSON)")
    parser.add_argument("--markdown", default=None, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    server_scores = parse_server_scores(args.server_score)
    rows = [checkpoint_row(path, server_scores) for path in args.scores_dirs]
    table = markdown(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if args.json:
        columns = [{"column": column, "benchmark": stem, "metric": metric} for column, stem, metric in COLUMNS]
        write_json(args.json, {"columns": columns, "rows": rows}, indent=2)
    print(json.dumps({row["checkpoint"]: row["scores"] for row in rows}))


if __name__ == "__main__":
    main()
