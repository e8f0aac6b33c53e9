"""`python -m moellava.demo` (`make demo`): the whole MoE-LLaVA pipeline on a toy problem, on CPU.

1. builds a tiny Llama, a tiny CLIP tower and a SentencePiece tokenizer (all random / trained here) and a
   synthetic dataset of coloured shapes;
2. runs Stage 1 -> 2 -> 3 through `scripts/train_stage{1,2,3}.sh` (the `deepspeed` launcher, one CPU
   process) with environment overrides, showing each stage's command and its losses;
3. asks the trained MoE model about held-out images with the CLI and prints its answers and accuracy
   against chance;
4. evaluates it on a POPE-style and a TextVQA-style set of held-out images through scripts/eval/ (see
   moellava/demo/benchmarks.py);
5. captures the MoE model's routing on 48 samples and draws the routing figures into `demo_output/vis/`.
Everything is seeded; the output goes to `demo_output/` (recreated on every run).
"""

import argparse
import ast
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from moellava.demo import benchmarks, data, models, routing
from moellava.utils import add_local_rank_argument

logger = logging.getLogger("moellava.demo")

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEP_LOG = re.compile(r"^\{'loss': .*\}$")


@dataclass(frozen=True)
class StageRecipe:
    """What one stage of the demo overrides in its script (everything else is the script's default)."""

    script: str
    steps: int
    lr: str


# Sized to finish the three stages in a few minutes on 2 CPU cores. The learning rates are high because
# every weight starts random (the real recipe fine-tunes pretrained models with 1e-3 / 2e-5 / 2e-5);
# stage 2 carries most of the learning, as the LLM itself has to learn the language of the answers.
STAGES = (
    StageRecipe("train_stage1.sh", steps=40, lr="2e-3"),
    StageRecipe("train_stage2.sh", steps=400, lr="2e-3"),
    StageRecipe("train_stage3.sh", steps=150, lr="5e-4"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_environment(overrides: Dict[str, str]) -> Dict[str, str]:
    """The scripts' environment on this CPU machine: this interpreter's launchers first on PATH, no network,
    DeepSpeed's CPU accelerator, one process, fp32."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        NUM_GPUS="1",
        MASTER_PORT=str(free_port()),
        BATCH="16",
        GRAD_ACC="1",
        WORKERS="1",
        BF16="False",
        TF32="False",
        GRAD_CKPT="False",
        MAX_LEN="256",
        LOG_STEPS="10",
        SAVE_STEPS="100000",
        REPORT_TO="none",
        EXTRA_ARGS="--disable_tqdm True",
    )
    env.update(overrides)
    return env


def run_stage(number: int, recipe: StageRecipe, overrides: Dict[str, str], log_path: str) -> float:
    """Run one stage script; show its command and its loss lines, keep the full output in `log_path`."""
    env = script_environment({"MAX_STEPS": str(recipe.steps), "LR": recipe.lr, **overrides})
    command = ["bash", os.path.join(REPO_DIR, "scripts", recipe.script)]
    print(f"\n=== Stage {number}: {recipe.script} ===", flush=True)
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=REPO_DIR)
        for line in process.stdout:
            log.write(line)
            line = line.rstrip("\n")
            if line.startswith("+ deepspeed"):
                print(line, flush=True)
            elif STEP_LOG.match(line):
                print(f"  stage {number} {format_step(line)}", flush=True)
        returncode = process.wait()
    if returncode != 0:
        with open(log_path, encoding="utf-8") as log:
            tail = log.readlines()[-40:]
        raise SystemExit(f"Stage {number} failed (exit {returncode}); the end of {log_path}:\n{''.join(tail)}")
    return time.time() - start


def format_step(line: str) -> str:
    values = ast.literal_eval(line)  # the dict the Trainer printed
    parts = [f"epoch {values['epoch']:.2f}", f"lm_loss {values['lm_loss']:.3f}"]
    if "aux_loss_per_layer" in values:
        parts.append(f"aux/layer {values['aux_loss_per_layer']:.3f}")
    return "  ".join(parts)


def lm_losses(output_dir: str) -> List[float]:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    return [entry["lm_loss"] for entry in history if "lm_loss" in entry]


def loss_change(losses: List[float], window: int = 2) -> Tuple[float, float]:
    """Mean of the first and of the last `window` logged losses (each log averages LOG_STEPS steps):
    single batches differ a lot, image batches and text-only batches most."""
    window = max(1, min(window, len(losses) // 2))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def first_word(text: str, words: Sequence[str]) -> Optional[str]:
    found = [(text.find(word), word) for word in words if word in text]
    return min(found)[1] if found else None


def evaluate(model_dir: str, data_dir: str, eval_path: str, cli_example: bool = True) -> Dict[str, float]:
    """Ask the colour and the shape of every held-out image (greedy); print the answers and the accuracy."""
    import contextlib

    from PIL import Image

    from moellava.conversation import get_conv_template
    from moellava.serve.cli import ChatSession, default_conv_mode

    with contextlib.redirect_stdout(sys.stderr):
        from moellava.model.builder import load_pretrained_model

    with open(eval_path, encoding="utf-8") as f:
        items = json.load(f)
    if cli_example:
        first = os.path.join(data_dir, items[0]["image"])
        command = [sys.executable, "-m", "moellava.serve.cli", "--model-path", model_dir, "--image-file", first,
                   "--query", data.COLOUR_QUESTIONS[0], "--temperature", "0", "--max-new-tokens", "12"]
        print("\n+ " + " ".join(command), flush=True)
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_DIR, env=script_environment({}))
        if result.returncode != 0:
            raise SystemExit(f"The CLI failed:\n{result.stderr[-3000:]}")
        print(f"  answer: {result.stdout.strip()!r} (truth: {items[0]['colour']} {items[0]['shape']})", flush=True)

    tokenizer, model, processor, _ = load_pretrained_model(model_dir)
    template = default_conv_mode(model.config)
    questions = (("colour", data.COLOUR_QUESTIONS[0], sorted(data.COLOURS)),
                 ("shape", data.SHAPE_QUESTIONS[0], data.SHAPES))
    correct = {"colour": 0, "shape": 0}
    print(f"\nHeld-out images ({len(items)}), greedy answers of the stage-3 MoE model:", flush=True)
    for item in items:
        image = Image.open(os.path.join(data_dir, item["image"])).convert("RGB")
        answers = []
        for kind, question, words in questions:
            session = ChatSession(tokenizer, model, processor["image"], image, get_conv_template(template),
                                  temperature=0, max_new_tokens=12)
            answer = session.ask(question)
            ok = first_word(answer.lower(), words) == item[kind]
            correct[kind] += ok
            answers.append(f"{answer!r}{'' if ok else ' ✗'}")
        print(f"  {item['image']}: {item['colour']:>6} {item['shape']:<8} -> {answers[0]:<16} {answers[1]}",
              flush=True)
    total = len(items)
    return {
        "colour_accuracy": correct["colour"] / total,
        "shape_accuracy": correct["shape"] / total,
        "accuracy": (correct["colour"] + correct["shape"]) / (2 * total),
        "chance": (1 / len(data.COLOURS) + 1 / len(data.SHAPES)) / 2,
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=os.path.join(REPO_DIR, "demo_output"))
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--eval-images", type=int, default=48)
    add_local_rank_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # The demo runs on CPU everywhere, in this process (evaluation) as in the training scripts.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start = time.time()
    out = os.path.abspath(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "logs"))

    print(f"Building the toy setup in {out}: tokenizer, CLIP tower, Llama, {args.train_images} training images",
          flush=True)
    paths = data.build_dataset(os.path.join(out, "data"), num_train_images=args.train_images,
                               num_eval_images=args.eval_images)
    tokenizer_dir = models.build_tokenizer(os.path.join(out, "tokenizer"))
    tower_dir = models.build_tower(os.path.join(out, "tower"))
    llm_dir = models.build_llm(os.path.join(out, "llm"), tokenizer_dir)

    stage_dirs = [os.path.join(out, f"stage{i}") for i in (1, 2, 3)]
    common = {"IMAGE_TOWER": tower_dir, "IMAGE_FOLDER": paths["image_folder"], "VERSION": "v1"}
    overrides = [
        {"MODEL": llm_dir, "DATA_PATH": paths["stage1"], "OUTPUT_DIR": stage_dirs[0], "VERSION": "plain"},
        {"MODEL": llm_dir, "DATA_PATH": paths["stage2"], "OUTPUT_DIR": stage_dirs[1],
         "PRETRAIN_ADAPTER": os.path.join(stage_dirs[0], "mm_projector.bin")},
        {"MODEL": stage_dirs[1], "DATA_PATH": paths["stage3"], "OUTPUT_DIR": stage_dirs[2]},
    ]
    summary = []
    for number, (recipe, override) in enumerate(zip(STAGES, overrides), start=1):
        seconds = run_stage(number, recipe, {**common, **override}, os.path.join(out, "logs", f"stage{number}.log"))
        first, last = loss_change(lm_losses(override["OUTPUT_DIR"]))
        summary.append((number, first, last, seconds))
        print(f"  stage {number}: LM loss {first:.3f} -> {last:.3f} in {seconds:.0f} s", flush=True)

    scores = evaluate(stage_dirs[2], paths["image_folder"], paths["eval"])
    scores.update(benchmarks.evaluate_benchmarks(stage_dirs[2], paths, out, REPO_DIR, script_environment))
    routing.plot_routing(stage_dirs[2], paths["stage3"], paths["image_folder"], os.path.join(out, "vis"))
    print("\n=== Summary ===")
    for number, first, last, seconds in summary:
        print(f"Stage {number}: LM loss {first:.3f} -> {last:.3f} (mean of the first and last 20 steps; "
              f"{'falls' if last < first else 'DOES NOT FALL'}), {seconds:.0f} s")
    print(f"Held-out accuracy: colour {scores['colour_accuracy']:.0%}, shape {scores['shape_accuracy']:.0%}, "
          f"overall {scores['accuracy']:.0%} (chance {scores['chance']:.0%})")
    print(f"Benchmarks: POPE-style F1 {scores['pope_f1']:.1f}, accuracy {scores['pope_accuracy']:.1f}, yes ratio "
          f"{scores['pope_yes_ratio']:.1f}; TextVQA-style accuracy {scores['textvqa_accuracy']:.1f}")
    print(f"Total time: {time.time() - start:.0f} s. Checkpoints, logs and data: {out}")
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"stages": [{"stage": n, "first_lm_loss": a, "last_lm_loss": b, "seconds": s}
                              for n, a, b, s in summary], **scores}, f, indent=2)
