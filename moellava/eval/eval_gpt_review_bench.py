"""LLaVA-Bench (in the wild) reviews, as the original's `eval_gpt_review_bench.py` builds them, without the
network: the GPT judge is not called here.

    # 1. the review requests, one chat request per question (written to reviews/requests/CKPT.jsonl)
    python -m moellava.eval.eval_gpt_review_bench -q eval/llava-bench-in-the-wild/questions.jsonl \
        -c eval/llava-bench-in-the-wild/context.jsonl -r moellava/eval/table/rule.json \
        -a eval/llava-bench-in-the-wild/answers_gpt4.jsonl eval/llava-bench-in-the-wild/answers/CKPT.jsonl \
        -o eval/llava-bench-in-the-wild/reviews/CKPT.jsonl
    # 2. send them to the judge yourself; save its replies as jsonl {"id": <request id>, "content": <reply>}
    # 3. the same command with --responses replies.jsonl writes the reviews file; summarize_gpt_review scores it

Questions and the two answer files are paired by position, as in the original (a warning counts the
positions whose question ids differ). A review's score pair is read from the first line of the reply
("8 7" or "8,7"; "8, 7" does not parse, as in the original); a reply that does not parse scores [-1, -1].
"""

import argparse
import logging
import os
from typing import Dict, List, Optional

from moellava.eval.records import EvalInputError, command_line, read_json, read_jsonl, write_jsonl

logger = logging.getLogger("moellava.eval")

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE = "gpt-3.5-turbo"  # the original MoE-LLaVA script's judge (LLaVA used gpt-4-0314)
RULE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "table", "rule.json")


def parse_score(review: str) -> List[float]:
    """The two scores on the first line of a review, or [-1, -1]."""
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) == 2:
        try:
            return [float(parts[0]), float(parts[1])]
        except ValueError:
            pass
    return [-1, -1]


def review_requests(questions: List[dict], contexts: List[dict], answers1: List[dict], answers2: List[dict],
                    rules: Dict[str, dict], judge: str = JUDGE, max_tokens: int = 1024) -> List[dict]:
    """One request per question: the ids a review records, and the chat messages for the judge."""
    captions = {context["image"]: context["caption"] for context in contexts}
    if not len(questions) == len(answers1) == len(answers2):
        logger.warning("LLaVA-Bench: %d questions, %d and %d answers; paired by position, only the first %d are "
                       "reviewed.", len(questions), len(answers1), len(answers2),
                       min(len(questions), len(answers1), len(answers2)))
    requests, mismatched = [], 0
    for idx, (question, ans1, ans2) in enumerate(zip(questions, answers1, answers2)):
        mismatched += not question["question_id"] == ans1["question_id"] == ans2["question_id"]
        if question["image"] not in captions:
            raise EvalInputError(f"question {question['question_id']!r}: no context for image {question['image']!r}.")
        caption = captions[question["image"]]
        caption = "\n".join(caption) if isinstance(caption, list) else caption
        category = "llava_bench_" + question["category"]
        if category not in rules:
            raise EvalInputError(f"Visual QA category not found in rule file: {category}.")
        role, prompt = rules[category]["role"], rules[category]["prompt"]
        content = (f"[Context]\n{caption}\n\n"
                   f"[Question]\n{question['text']}\n\n"
                   f"[{role} 1]\n{ans1['text']}\n\n[End of {role} 1]\n\n"
                   f"[{role} 2]\n{ans2['text']}\n\n[End of {role} 2]\n\n"
                   f"[System]\n{prompt}\n\n")
        requests.append({
            "id": idx + 1,
            "question_id": question["question_id"],
            "answer1_id": ans1.get("answer_id", ans1["question_id"]),
            "answer2_id": ans2["answer_id"],
            "category": category,
            "model": judge,
            "temperature": 0.2,
            "max_tokens": max_tokens,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
        })
    if mismatched:
        logger.warning("LLaVA-Bench: at %d position(s) the question and the two answers have different question ids "
                       "(the files are not in the same order); the original pairs them anyway.", mismatched)
    return requests


def reviews_from_responses(requests: List[dict], responses: List[dict]) -> List[dict]:
    """Review lines `{id, question_id, answer1_id, answer2_id, category, content, tuple}` for the replies."""
    replies = {response["id"]: response["content"] for response in responses}
    missing = [r["id"] for r in requests if r["id"] not in replies]
    if missing:
        raise EvalInputError(f"{len(missing)} review request(s) have no reply, e.g. id {missing[0]}.")
    reviews = []
    for request in requests:
        review = {key: request[key] for key in ("id", "question_id", "answer1_id", "answer2_id", "category")}
        review.update(content=replies[request["id"]], tuple=parse_score(replies[request["id"]]))
        reviews.append(review)
    unparsed = sum(1 for review in reviews if review["tuple"] == [-1, -1])
    if unparsed:
        logger.warning("LLaVA-Bench: %d review(s) have no score pair on their first line: scored [-1, -1], as in "
                       "the original.", unparsed)
    return reviews


@command_line
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--question", required=True)
    parser.add_argument("-c", "--context", required=True)
    parser.add_argument("-a", "--answer-list", nargs=2, required=True, metavar=("REFERENCE", "ANSWERS"))
    parser.add_argument("-r", "--rule", default=RULE_FILE)
    parser.add_argument("-o", "--output", required=True, help="the reviews file (jsonl)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="maximum number of tokens of a review")
    parser.add_argument("--judge", default=JUDGE, help="the judge model named in the requests")
    parser.add_argument("--requests", default=None, help="default: requests/<output name> beside the output")
    parser.add_argument("--responses", default=None, help="the judge's replies (jsonl {id, content})")
    args = parser.parse_args(argv)
    questions = read_jsonl(args.question, ("question_id", "image", "text", "category"))
    contexts = read_jsonl(args.context, ("image", "caption"))
    references = read_jsonl(args.answer_list[0], ("question_id", "text"))
    answers = read_jsonl(args.answer_list[1], ("question_id", "text", "answer_id"))
    requests = review_requests(questions, contexts, references, answers, read_json(args.rule), args.judge,
                               args.max_tokens)
    requests_file = args.requests or os.path.join(os.path.dirname(args.output), "requests",
                                                  os.path.basename(args.output))
    write_jsonl(requests_file, requests)
    print(f"{len(requests)} review requests for {args.judge}: {requests_file}")
    if args.responses is None:
        print("No judge is called here (no network): send the requests, save the replies as jsonl "
              "{\"id\", \"content\"} and rerun with --responses.")
        return
    write_jsonl(args.output, reviews_from_responses(requests, read_jsonl(args.responses, ("id", "content"))))
    print(f"Reviews: {args.output}")


if __name__ == "__main__":
    main()
