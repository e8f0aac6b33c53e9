"""MMBench answers from its TSV (`index, question, hint, A..D, answer, ..., image` with base64 images).

    python -m moellava.eval.model_vqa_mmbench --model-path CKPT --question-file eval/mmbench/mmbench_dev_20230712.tsv \
        --answers-file eval/mmbench/answers/mmbench_dev_20230712/CKPT.jsonl --single-pred-prompt --temperature 0

The question is the hint (when present), the question and one "\\n<letter>. <option>" line per option.
`--single-pred-prompt` asks for the letter (`--lang cn`: in Chinese); `--all-rounds` asks once per option,
rotating the options by one each round (the letters stay A, B, ...), and records the rotated `options` and
`option_char` with each answer, as the original does.
"""

import os
from typing import List

from moellava.eval.answers import ImageRef, Question
from moellava.eval.generation import answer_questions, build_parser
from moellava.eval.model_vqa_science import SINGLE_PRED_PROMPT
from moellava.eval.records import EvalInputError, command_line, is_none, read_table

ALL_OPTIONS = ("A", "B", "C", "D")
SINGLE_PRED_PROMPT_CN = "请直接回答选项字母。"


def row_options(row: dict) -> List[str]:
    """The options of a row up to the first missing one."""
    options = []
    for letter in ALL_OPTIONS:
        if is_none(row.get(letter)):
            break
        options.append(row[letter])
    return options


def load_questions(question_file: str, single_pred_prompt: bool, lang: str, all_rounds: bool) -> List[Question]:
    columns, rows = read_table(os.path.expanduser(question_file))
    missing = [c for c in ("index", "question", "hint", "image") if c not in columns]
    if missing:
        raise EvalInputError(f"{question_file} lacks the MMBench column(s) {missing} (it has {columns}).")
    suffix = SINGLE_PRED_PROMPT_CN if lang == "cn" else SINGLE_PRED_PROMPT
    questions = []
    for row in rows:
        if row["image"] is None:
            raise EvalInputError(f"{question_file}: question index {row['index']} has no image.")
        options = row_options(row)
        letters = list(ALL_OPTIONS[:len(options)])
        for round_id in range(len(options) if all_rounds else 1):
            question = row["question"] or ""
            if not is_none(row["hint"]):
                question = row["hint"] + "\n" + question
            for letter, option in zip(ALL_OPTIONS, options):
                question += "\n" + letter + ". " + option
            text = question + "\n" + suffix if single_pred_prompt else question
            questions.append(Question(row["index"], text, prompt=question, image=ImageRef(base64=row["image"]),
                                      round_id=round_id, extra={"options": options, "option_char": letters}))
            options = options[1:] + options[:1]
            letters = letters[1:] + letters[:1]
    return questions


@command_line
def main(argv=None) -> None:
    parser = build_parser(__doc__, "tables/question.jsonl", max_new_tokens=1024)
    parser.add_argument("--all-rounds", action="store_true")
    parser.add_argument("--single-pred-prompt", action="store_true")
    parser.add_argument("--lang", default="en", choices=["en", "cn"])
    args = parser.parse_args(argv)
    answer_questions(args, load_questions(args.question_file, args.single_pred_prompt, args.lang, args.all_rounds))


if __name__ == "__main__":
    main()
