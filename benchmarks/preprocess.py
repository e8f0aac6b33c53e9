"""Benchmark the labelling (`moellava.train.preprocess.preprocess`) against the seed's `+1/-1` arithmetic.

On generated LLaVA-style conversations (an image in the first question, questions of ~25 words, answers of
~110 words, i.e. ~180 tokens a round) with 1, 5, 10 and 20 rounds, it measures samples per second of:
* `ours`: `preprocess()` as training runs it (exact labels, linear in the length of the conversation);
* `seed`: the original MoE-LLaVA arithmetic, re-implemented as the baseline (`seed_labels` of
  tests/test_preprocess.py: `preprocess_v1` for the Llama tokenizer, BOS at 1, `len(round)` and
  `len(instruction) - 2`; `preprocess_phi` for Qwen, 0, `len(round) + 1` and `len(instruction) - 1`); it
  tokenizes every round once more and never checks;
* `prefix`: the previous exact labelling (`whole_prefix_labels` of tests/test_preprocess_labels.py): every
  answer boundary tokenizes the whole text before it (quadratic in the number of rounds).
Times are CPU seconds of this process (`time.process_time`, one thread: the tokenizers are pure Python plus
a single-threaded native core), the median of round-robin passes over the same conversations, so machine
load hits every method alike. `seed mism.` counts the samples the seed arithmetic would have masked
entirely ("tokenization mismatch"); ours are checked equal to the whole-prefix labels.

    python benchmarks/preprocess.py                     # both tokenizers, 1 5 10 20 rounds, 100 conversations
    python benchmarks/preprocess.py --samples 40 --repeats 3 --tokenizers qwen

The real vocabularies come from ../shared/data (the Llama-2 SentencePiece model of lmsys/vicuna-7b-v1.5 with
its tokenizer_config.json, the slow tokenizer training uses; Qwen's qwen.tiktoken).
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The official tokenizer folders, the seed arithmetic and the whole-prefix labels are the tests' own.
sys.path.insert(0, str(REPO / "tests"))

from conftest import SHARED_DATA, write_real_tokenizer_folder  # noqa: E402
from harness import machine_line  # noqa: E402
from test_preprocess import SEED_QWEN, SEED_V1, seed_labels  # noqa: E402
from test_preprocess_labels import rendered_pieces, whole_prefix_labels  # noqa: E402

from moellava import conversation as conversation_lib  # noqa: E402
from moellava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX  # noqa: E402
from moellava.tokenization import load_tokenizer  # noqa: E402
from moellava.train.preprocess import preprocess  # noqa: E402

# tokenizer -> (reference folder, template, the seed's arithmetic for it)
TOKENIZERS = {"llama": ("llama2", "v1", SEED_V1), "qwen": ("qwen", "qwen", SEED_QWEN)}
WORDS = (
    "the a of and to in is that it for on with as was at by this be from are or an image shows which there "
    "man woman people dog cat car street table two three several small large red blue green white black "
    "wooden standing sitting holding near behind next front background scene appears picture photo left "
    "right top bottom side water building tree sky cloud window door light shadow color colors person "
    "playing looking wearing shirt hat bag phone computer food plate cup bottle sign road train bus bike "
    "grass field beach snow mountain city room kitchen bed chair wall floor group children young old"
).split()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizers", nargs="+", choices=sorted(TOKENIZERS), default=["llama", "qwen"])
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--samples", type=int, default=100, help="conversations per round count")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per method (median)")
    parser.add_argument("--data", default=str(SHARED_DATA), help="folder with the reference vocabularies")
    return parser.parse_args(argv)


def sentence(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        word = rng.choice(WORDS)
        if i == 0 or out[-1].endswith("."):
            word = word.capitalize()
        if rng.random() < 0.03:
            word = str(rng.randint(2, 1999))
        out.append(word + ("." if rng.random() < 0.08 else "," if rng.random() < 0.05 else ""))
    return " ".join(out).rstrip(",.") + "."


def conversations(rounds: int, count: int, seed: int = 0):
    """LLaVA-style samples: `<image>` before the first question, then `rounds` question/answer pairs."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        turns = []
        for r in range(rounds):
            question = sentence(rng, rng.randint(15, 35)).rstrip(".") + "?"
            if r == 0:
                question = f"{DEFAULT_IMAGE_TOKEN}\n{question}"
            answer = sentence(rng, rng.randint(60, 160))
            if rng.random() < 0.2:
                answer = answer.replace(". ", ".\n", 1)
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        samples.append(turns)
    return samples


def seed_arithmetic(sources, tokenizer, offsets):
    """The seed's labels for each sample, as tensors (0 where it would report a mismatch and mask them all)."""
    labels = [torch.tensor(seed_labels(source, tokenizer, True, **offsets)) for source in sources]
    return labels, sum(int((target == IGNORE_INDEX).all()) for target in labels)


def whole_prefix(sources, tokenizer):
    return [torch.tensor(whole_prefix_labels(rendered_pieces(source), tokenizer, True)[1]) for source in sources]


def cpu_seconds(function) -> float:
    start = time.process_time()
    function()
    return time.process_time() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    print(f"Labelling throughput, CPU time of one thread (median of {args.repeats} round-robin passes), "
          f"{args.samples} generated LLaVA-style conversations per row")
    print(f"ratios: ours / seed arithmetic and ours / whole-prefix (both measured in this run); {machine_line('cpu')}")
    print()
    header = (f"{'tokenizer':>9} {'rounds':>6} {'tokens':>7} {'ours/s':>8} {'seed/s':>8} {'prefix/s':>9} "
              f"{'x seed':>7} {'x prefix':>8} {'seed mism.':>10}")
    print(header)
    print("-" * len(header))
    for name in args.tokenizers:
        folder, version, offsets = TOKENIZERS[name]
        tokenizer = load_tokenizer(write_real_tokenizer_folder(folder, work / folder, Path(args.data)))
        tokenizer.model_max_length = 10**6  # no truncation: every method labels the whole conversation
        conversation_lib.set_default_conversation(version)
        for rounds in args.rounds:
            sources = conversations(rounds, args.samples)
            ours = preprocess(sources, tokenizer, has_image=True)
            for mine, theirs in zip(ours["labels"], whole_prefix(sources, tokenizer)):
                if not torch.equal(mine, theirs):
                    raise AssertionError(f"{name}, {rounds} rounds: labels differ from the whole-prefix labels")
            mismatches = seed_arithmetic(sources, tokenizer, offsets)[1]
            methods = {
                "ours": lambda: preprocess(sources, tokenizer, has_image=True),
                "seed": lambda: seed_arithmetic(sources, tokenizer, offsets),
                "prefix": lambda: whole_prefix(sources, tokenizer),
            }
            times = {method: [] for method in methods}
            for _ in range(args.repeats):
                for method, function in methods.items():
                    times[method].append(cpu_seconds(function))
            rate = {method: args.samples / statistics.median(t) for method, t in times.items()}
            tokens = statistics.mean(len(ids) for ids in ours["input_ids"])
            print(f"{name:>9} {rounds:>6} {tokens:>7.0f} {rate['ours']:>8.1f} {rate['seed']:>8.1f} "
                  f"{rate['prefix']:>9.1f} {rate['ours'] / rate['seed']:>7.2f} "
                  f"{rate['ours'] / rate['prefix']:>8.2f} {mismatches:>6}/{args.samples}")
    conversation_lib.set_default_conversation("v1")


if __name__ == "__main__":
    main()
