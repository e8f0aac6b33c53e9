"""MME result files from an answers file, as `convert_answer_to_mme.py` of LLaVA's eval.zip: one
`<category>.txt` per category with the lines `image<TAB>question<TAB>ground truth<TAB>answer`, in the
answers file's order, for MME's `calculation.py` (here `mme_calculation`).

Run from eval/MME as the original (the defaults are its relative paths), or pass the paths:

    python -m moellava.eval.convert_answer_to_mme --experiment CKPT --data-path eval/MME/MME_Benchmark_release_version \
        --answers-dir eval/MME/answers --result-dir eval/MME/eval_tool/answers

The ground truth comes from the benchmark's `questions_answers_YN/*.txt` (or the category folder's own
`*.txt`), matched by (category, image, question); LLaVA's "Answer the question using a single word or
phrase." is taken off the prompt and " Please answer yes or no." put back, as the original does.
"""

import argparse
import logging
import os
from collections import defaultdict
from typing import Dict, List, Tuple

from moellava.eval.records import EvalInputError, command_line, read_jsonl

logger = logging.getLogger("moellava.eval")

LLAVA_SUFFIX = "Answer the question using a single word or phrase."
MME_SUFFIX = " Please answer yes or no."


def get_gt(data_path: str) -> Dict[Tuple[str, str, str], str]:
    """`{(category, txt file, question): answer}` from the MME benchmark folder."""
    if not os.path.isdir(data_path):
        raise EvalInputError(f"MME benchmark folder {data_path} does not exist (MME_Benchmark_release_version).")
    ground_truth = {}
    for category in sorted(os.listdir(data_path)):
        category_dir = os.path.join(data_path, category)
        if not os.path.isdir(category_dir):
            continue
        qa_path = os.path.join(category_dir, "questions_answers_YN")
        if not os.path.exists(os.path.join(category_dir, "images")):
            qa_path = category_dir
        if not os.path.isdir(qa_path):
            raise EvalInputError(f"{category_dir} has images/ but no questions_answers_YN/ folder.")
        for name in sorted(os.listdir(qa_path)):
            if not name.endswith(".txt"):
                continue
            with open(os.path.join(qa_path, name), encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise EvalInputError(f"{qa_path}/{name} line {number} is not 'question<TAB>answer'.")
                    ground_truth[(category, name, parts[0])] = parts[1]
    return ground_truth


def mme_question(prompt: str, category: str, file: str, ground_truth) -> str:
    """The benchmark's wording of an answers-file prompt."""
    if LLAVA_SUFFIX in prompt:
        prompt = prompt.replace(LLAVA_SUFFIX, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt = prompt + MME_SUFFIX
        if (category, file, prompt) not in ground_truth:
            prompt = prompt.replace(MME_SUFFIX, "  Please answer yes or no.")
    return prompt


def convert(answers: List[dict], ground_truth) -> Dict[str, List[Tuple[str, str, str, str]]]:
    """`{category: [(txt file, question, ground truth, answer)]}` in answers-file order."""
    results = defaultdict(list)
    for number, answer in enumerate(answers, start=1):
        category = answer["question_id"].split("/")[0]
        file = answer["question_id"].split("/")[-1].split(".")[0] + ".txt"
        question = mme_question(answer["prompt"], category, file, ground_truth)
        if (category, file, question) not in ground_truth:
            raise EvalInputError(f"answer {number} (question_id {answer['question_id']!r}): the MME benchmark has no "
                                 f"question {question!r} for {category}/{file}.")
        results[category].append((file, question, ground_truth[category, file, question], answer["text"]))
    broken = sum(1 for rows in results.values() for row in rows if "\t" in row[3] or "\n" in row[3])
    if broken:
        logger.warning("MME: %d answer(s) contain a tab or a newline; written as they are, the calculation "
                       "misreads their lines (as the official one does).", broken)
    return results


@command_line
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="the answers file's name: <answers-dir>/<experiment>.jsonl")
    parser.add_argument("--data-path", default="MME_Benchmark_release_version")
    parser.add_argument("--answers-dir", default="answers")
    parser.add_argument("--result-dir", default=os.path.join("eval_tool", "answers"),
                        help="the category files go to <result-dir>/<experiment>/")
    args = parser.parse_args(argv)
    ground_truth = get_gt(args.data_path)
    answers = read_jsonl(os.path.join(args.answers_dir, f"{args.experiment}.jsonl"), ("question_id", "prompt", "text"))
    results = convert(answers, ground_truth)
    result_dir = os.path.join(args.result_dir, args.experiment)
    os.makedirs(result_dir, exist_ok=True)
    for category, rows in results.items():
        with open(os.path.join(result_dir, f"{category}.txt"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write("\t".join(row) + "\n")
    print(f"MME result files for {len(results)} categories: {result_dir}")


if __name__ == "__main__":
    main()
