"""Answers for a jsonl question file `{question_id, image, text}`, one line per question: VQAv2, GQA,
TextVQA, POPE, MME, VizWiz and SEED (their `llava_*.jsonl` files), short answers (`--max_new_tokens 128`).

    python -m moellava.eval.model_vqa_loader --model-path CKPT --question-file eval/pope/llava_pope_test.jsonl \
        --image-folder eval/pope/val2014 --answers-file eval/pope/answers/CKPT.jsonl --temperature 0 --batch-size 8
"""

import os
from typing import List

from moellava.eval.answers import ImageRef, Question
from moellava.eval.generation import answer_questions, build_parser
from moellava.eval.records import command_line, read_jsonl


def load_questions(question_file: str, image_folder: str) -> List[Question]:
    lines = read_jsonl(os.path.expanduser(question_file), ("question_id", "image", "text"))
    return [Question(line["question_id"], line["text"], prompt=line["text"],
                     image=ImageRef(path=os.path.join(image_folder, line["image"]))) for line in lines]


@command_line
def main(argv=None, max_new_tokens: int = 128, description: str = __doc__) -> None:
    args = build_parser(description, "tables/question.jsonl", max_new_tokens).parse_args(argv)
    answer_questions(args, load_questions(args.question_file, args.image_folder))


if __name__ == "__main__":
    main()
