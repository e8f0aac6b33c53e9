"""ScienceQA answers from LLaVA's question file (`llava_test_CQM-A.json`: a JSON list of
`{id, [image], conversations}`); the question is the first human turn without `<image>`.

    python -m moellava.eval.model_vqa_science --model-path CKPT --question-file eval/scienceqa/llava_test_CQM-A.json \
        --image-folder eval/scienceqa/images/test --answers-file eval/scienceqa/answers/CKPT.jsonl \
        --single-pred-prompt --temperature 0

`--single-pred-prompt` asks for the option letter directly; `--answer-prompter` adds a second pass that
continues the first answer with " ###\\nANSWER:" (up to 64 tokens) and records
"<first answer>\\n The answer is <second answer>".
"""

import os
from typing import List, Sequence

from moellava.eval.answers import ImageRef, Question
from moellava.eval.generation import AnswerGenerator, Encoded, PromptEncoder, answer_questions, build_parser
from moellava.eval.records import EvalInputError, command_line, read_json

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
ANSWER_PROMPTER = " ###\nANSWER:"


def load_questions(question_file: str, image_folder: str, single_pred_prompt: bool) -> List[Question]:
    items = read_json(os.path.expanduser(question_file))
    if not isinstance(items, list):
        raise EvalInputError(f"{question_file} is not a JSON list of questions (LLaVA's ScienceQA format).")
    questions = []
    for number, item in enumerate(items, start=1):
        conversations = item.get("conversations") if isinstance(item, dict) else None
        if not conversations or "id" not in item or "value" not in conversations[0]:
            raise EvalInputError(f"{question_file} entry {number} has no id or no first turn with a 'value'.")
        text = conversations[0]["value"].replace("<image>", "").strip()
        prompt = text
        image = None
        if "image" in item:
            image = ImageRef(path=os.path.join(image_folder, item["image"]))
            prompt = "<image>\n" + prompt
        if single_pred_prompt:
            text += "\n" + SINGLE_PRED_PROMPT
            prompt += "\n" + SINGLE_PRED_PROMPT
        questions.append(Question(item["id"], text, prompt=prompt, image=image))
    return questions


def answer_prompter(generator: AnswerGenerator, encoder: PromptEncoder, questions: Sequence[Question]):
    """Two passes per batch: the answer, then its continuation after " ###\\nANSWER:"."""

    def answer_batch(batch: List[Encoded]) -> List[str]:
        pixels = [e.pixels for e in batch]
        reasoning = generator.generate([e.input_ids for e in batch], pixels)
        followups = [encoder.ids(encoder.prompt(questions[e.index]) + text + ANSWER_PROMPTER)
                     for e, text in zip(batch, reasoning)]
        answers = generator.generate(followups, pixels, max_new_tokens=64)
        return [f"{first}\n The answer is {second}" for first, second in zip(reasoning, answers)]

    return answer_batch


@command_line
def main(argv=None) -> None:
    parser = build_parser(__doc__, "tables/question.json", max_new_tokens=1024)
    parser.add_argument("--answer-prompter", action="store_true")
    parser.add_argument("--single-pred-prompt", action="store_true")
    args = parser.parse_args(argv)
    questions = load_questions(args.question_file, args.image_folder, args.single_pred_prompt)
    answer_questions(args, questions, answer_prompter if args.answer_prompter else None)


if __name__ == "__main__":
    main()
