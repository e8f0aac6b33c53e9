"""Benchmark answer generation: questions/s of `model_vqa_loader` at batch 1 against batch 8 and 16, on the
same model in the same process, and whether the greedy answers are identical.

A random LLaVA-Llama MoE checkpoint (4 experts, top-2, on every other layer) with a tiny CLIP tower is built
in a temporary folder, with a question file over images of several sizes. Each batch size answers every
question through `generation.write_answers` (the loop `model_vqa_loader` runs: DataLoader, left-padded
batches, answers file); the passes run round-robin, `--repeats` times, and the median is reported, so a
change in machine load hits every batch size alike. A random model rarely emits its end token, so most
answers run to `--max-new-tokens`.

    python benchmarks/eval_throughput.py                # 64 questions, 16 new tokens, hidden 256
    python benchmarks/eval_throughput.py --quick        # 24 questions, hidden 128: about a minute on 2 CPU cores
    python benchmarks/eval_throughput.py --device cuda --hidden 1024 --layers 8 --questions 256
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_DIR, "tests"))  # the shared tiny-model builders


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dense", action="store_true", help="a dense model instead of the MoE one")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="24 questions, hidden 128, 1 repeat")
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.questions, args.hidden, args.repeats = 24, 128, 1
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def build_checkpoint(root: str, args) -> str:
    import tiny_llava

    tokenizer = tiny_llava.build_tiny_llama_tokenizer(os.path.join(root, "tokenizer"))
    tower = tiny_llava.build_tiny_clip_tower(os.path.join(root, "clip"))
    moe = None if args.dense else dict(num_experts=4, top_k_experts=2, moe_mode="sparse")
    return tiny_llava.build_tiny_llava_llama(
        os.path.join(root, "checkpoint"), tokenizer, tower, seed=0, moe=moe, image_aspect_ratio="pad",
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=512)


def write_questions(root: str, count: int) -> str:
    import eval_fixtures

    questions = ["What is in the image?", "What colour is the largest object on the left side of the picture?",
                 "How many?", "Is there a cat in the image?\nAnswer the question using a single word or phrase."]
    for i in range(count):
        eval_fixtures.image(os.path.join(root, "images", f"{i}.png"), i)
    eval_fixtures.write_jsonl(os.path.join(root, "questions.jsonl"), [
        {"question_id": i, "image": f"{i}.png", "text": questions[i % len(questions)]} for i in range(count)])
    return os.path.join(root, "questions.jsonl")


def main(argv=None) -> None:
    args = parse_args(argv)
    from moellava.eval import model_vqa_loader
    from moellava.eval.answers import AnswersFile
    from moellava.eval.generation import AnswerGenerator, GenerationSettings, PromptEncoder, load_for_eval, \
        write_answers

    with tempfile.TemporaryDirectory() as root:
        checkpoint = build_checkpoint(root, args)
        question_file = write_questions(root, args.questions)
        eval_args = model_vqa_loader.build_parser("", question_file, args.max_new_tokens).parse_args(
            ["--model-path", checkpoint, "--device", args.device, "--temperature", "0"])
        tokenizer, model, processor, conv_mode = load_for_eval(eval_args)
        encoder = PromptEncoder(tokenizer, processor, model.config, conv_mode)
        generator = AnswerGenerator(tokenizer, model, encoder.template.stop_str,
                                    GenerationSettings(temperature=0, max_new_tokens=args.max_new_tokens))
        questions = model_vqa_loader.load_questions(question_file, os.path.join(root, "images"))
        write_answers(generator, encoder, questions[:4], AnswersFile(os.path.join(root, "warmup.jsonl"), "b"), 4, 0)

        rates = {size: [] for size in args.batch_sizes}
        texts = {}
        for repeat in range(args.repeats):
            for size in args.batch_sizes:
                path = os.path.join(root, f"answers_{size}_{repeat}.jsonl")
                start = time.perf_counter()
                write_answers(generator, encoder, questions, AnswersFile(path, "bench"), size, num_workers=0)
                rates[size].append(len(questions) / (time.perf_counter() - start))
                with open(path, encoding="utf-8") as f:
                    texts[size] = [json.loads(line)["text"] for line in f]

    kind = "dense" if args.dense else "MoE (4 experts, top-2, every other layer)"
    print(f"\nLLaVA-Llama {kind}, hidden {args.hidden}, {args.layers} layers, CLIP 32 px (16 image tokens); "
          f"{args.device}, {next(model.parameters()).dtype}; {args.questions} questions, greedy, "
          f"max_new_tokens {args.max_new_tokens}; median of {args.repeats} pass(es)\n")
    first = args.batch_sizes[0]
    base = statistics.median(rates[first])
    print(f"| batch | questions/s | vs batch {first} | answers identical to batch {first} |")
    print("|---|---|---|---|")
    results = []
    for size in args.batch_sizes:
        rate = statistics.median(rates[size])
        same = texts[size] == texts[first]
        results.append({"batch_size": size, "questions_per_s": rate, "ratio": rate / base, "identical": same})
        print(f"| {size} | {rate:.2f} | {rate / base:.2f}x | {'yes' if same else 'NO'} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    if not all(r["identical"] for r in results):
        raise SystemExit("Batched greedy answers differ from the batch-1 answers.")


if __name__ == "__main__":
    main()
