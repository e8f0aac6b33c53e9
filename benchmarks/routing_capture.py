"""Benchmark routing capture: eval-style generation on a tiny MoE LLaVA with and without `RoutingRecorder`.

Each pass answers the same prompts (one image each, greedy, a fixed number of new tokens, KV cache on),
as an eval answer generator does, every prompt twice in a row: plainly and inside `with recorder:` with
`finish()` after it, in alternating order, so a change in machine load hits both alike; the capture is
saved at the end of the pass and its time counted. Times are this process's CPU time (one torch thread):
on a shared machine, wall time mostly measures the other jobs. The median pass is reported, with the
overhead as a ratio against the baseline measured in the same run.

    python benchmarks/routing_capture.py              # 16 prompts x 32 tokens, 16 and 576 image tokens
    python benchmarks/routing_capture.py --quick      # 8 prompts x 16 tokens, 3 passes
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # the tiny model builders the tests use

import tiny_llava  # noqa: E402
from moellava.mm_utils import tokenizer_image_token  # noqa: E402
from moellava.tokenization import load_tokenizer  # noqa: E402
from moellava.vis.capture import RoutingRecorder  # noqa: E402

QUESTIONS = ("What colour is the shape?", "What shape is it?", "Describe the image briefly.", "Is it round?")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--passes", type=int, default=5, help="timed passes of each kind")
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[16, 576], choices=[16, 576],
                        help="16: the demo's 32 px tower; 576: a 336 px / patch 14 tower like CLIP ViT-L/14-336")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the timing steady)")
    parser.add_argument("--quick", action="store_true", help="8 prompts x 16 tokens, 3 passes")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.passes = 8, 16, 3
    return args


def build(root: str, image_tokens: int):
    tokenizer_dir = tiny_llava.build_tiny_llama_tokenizer(os.path.join(root, "tokenizer"))
    tower = {16: {}, 576: {"image_size": 336, "patch_size": 14}}[image_tokens]
    tower_dir = tiny_llava.build_tiny_clip_tower(os.path.join(root, f"tower{image_tokens}"), **tower)
    dense = tiny_llava.tiny_llava_llama(tokenizer_dir, tower_dir, max_position_embeddings=1024)
    model = tiny_llava.upcycle_llava_llama(dense, num_experts=4, moe_mode="sparse", top_k_experts=2)
    tiny_llava.perturb_experts(model, scale=0.2)
    tokenizer = load_tokenizer(tokenizer_dir)
    prompts = [tokenizer_image_token(f"A chat. USER: <image>\n{QUESTIONS[i % len(QUESTIONS)]} ASSISTANT:", tokenizer,
                                     return_tensors="pt").unsqueeze(0) for i in range(len(QUESTIONS))]
    size = model.get_image_tower().config.image_size
    return model, prompts, size


def answer(model, prompt, pixels, args):
    return model.generate(prompt, images=pixels, do_sample=False, max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens, use_cache=True)


def timed_passes(model, prompts, size, args, folder):
    """Per pass: every prompt answered twice in a row, without and with capture (so load changes hit both
    alike), then the capture saved. Returns the medians over passes of (baseline, capture + save, save)."""
    baseline, capture, saving = [], [], []
    for repeat in range(args.passes + 1):  # the first round warms up and is not counted
        generator = torch.Generator().manual_seed(0)
        recorder = RoutingRecorder(model)
        base = captured = 0.0
        with torch.inference_mode():
            for i in range(args.prompts):
                prompt = prompts[i % len(prompts)]
                pixels = torch.randn(1, 3, size, size, generator=generator)
                # Which of the two goes first alternates, so neither always finds the caches warm.
                for plain in ((True, False) if i % 2 else (False, True)):
                    start = time.process_time()
                    if plain:
                        answer(model, prompt, pixels, args)
                        base += time.process_time() - start
                        continue
                    with recorder:
                        output = answer(model, prompt, pixels, args)
                        recorder.finish(output[:, prompt.shape[1]:], sample_ids=[i])
                    captured += time.process_time() - start
        start = time.process_time()
        recorder.save(os.path.join(folder, "routing"))
        saved = time.process_time() - start
        if repeat:
            baseline.append(base)
            capture.append(captured + saved)
            saving.append(saved)
    return statistics.median(baseline), statistics.median(capture), statistics.median(saving)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"Routing capture overhead: {args.prompts} prompts x {args.new_tokens} new tokens (greedy, KV cache), "
          f"tiny MoE LLaVA (hidden 64, 4 layers, MoE layers 0 and 2, 4 experts, top-2), {args.threads} thread(s), "
          f"median of {args.passes} alternating passes")
    print()
    print("| image tokens | baseline (CPU s) | with capture (CPU s) | of which save (CPU s) | overhead |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        for image_tokens in args.image_tokens:
            model, prompts, size = build(root, image_tokens)
            base, captured, saving = timed_passes(model, prompts, size, args, root)
            print(f"| {image_tokens} | {base:.3f} | {captured:.3f} | {saving:.3f} | {captured / base - 1:+.1%} |",
                  flush=True)


if __name__ == "__main__":
    main()
