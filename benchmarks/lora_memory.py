"""Benchmark one stage-3 (MoE) training step with LoRA against full MoE-tuning: trainable parameters, step
time and peak memory, ratios against full training measured in the same run.

Both rows are the same random MoE-LLaVA-Llama (sparse MoE layers, 4 experts, top-2, a small CLIP tower),
with the trainable set that `moellava/train/train.py` gives it:
* full: stage 3's recipe, the FFN weights of every layer (experts included), the routers and the projector;
* lora: adapters (`--lora_r`, `--lora_alpha`) on every attention and FFN Linear of the LLM, one per expert,
  plus the routers and the projector in full.
A step is forward, backward and an AdamW update (its states created at the first step, as in training).
Each row runs in a fresh process, so peaks do not mix; the step is timed after one warm-up step.

    python benchmarks/lora_memory.py            # hidden 1024, 8 layers, 4 experts, batch 2 x 256 tokens
    python benchmarks/lora_memory.py --quick    # hidden 256, 4 layers: under a minute on 2 CPU cores
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("full", "lora")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256, help="text tokens per sample (plus 16 image tokens)")
    parser.add_argument("--lora-r", type=int, default=128, help="the recipe's (LLaVA finetune_lora)")
    parser.add_argument("--lora-alpha", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="hidden 256, intermediate 688, 4 layers, vocab 4096, r 32")
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab = 256, 688, 4, 4, 4096
        args.lora_r, args.lora_alpha = 32, 64
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_model(config: str, args, tower_dir: str):
    """The upcycled MoE model with the trainable set of `config`, as train.py sets it."""
    import torch

    from moellava.model import MoELLaVALlamaConfig, MoELLaVALlamaForCausalLM
    from moellava.model.moe import build_moe_settings
    from moellava.tokenization import get_family
    from moellava.train.train import add_lora_adapters, set_trainable

    torch.manual_seed(0)
    model = MoELLaVALlamaForCausalLM(MoELLaVALlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=2 * args.tokens))
    vision = SimpleNamespace(image_tower=tower_dir, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                             image_projector_type="mlp2x_gelu", pretrain_mm_mlp_adapter=None)
    model.get_model().initialize_vision_modules(vision)
    lora = config == "lora"
    train_modules = ["wg"] if lora else list(get_family("llama").train_modules)
    model.initialize_moe_modules(build_moe_settings(args.layers, num_experts=[args.experts], moe_mode="sparse",
                                                    top_k_experts=2, train_modules=train_modules))
    model_args = SimpleNamespace(model_name_or_path="random", moe_enable=True, tune_mm_mlp_adapter=False,
                                 freeze_backbone=False, mm_use_im_start_end=False)
    training_args = SimpleNamespace(lora_enable=lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                                    lora_dropout=0.05, lora_bias="none", lora_target=None, lora_weight_path="",
                                    freeze_mm_mlp_adapter=False)
    if lora:
        add_lora_adapters(model, model_args, training_args, "llama")
    set_trainable(model, model_args, training_args, train_modules)
    return model.to(args.device).train()


def worker(config: str, args) -> dict:
    import torch

    from moellava.constants import IMAGE_TOKEN_INDEX
    from moellava.demo.models import TowerSize, build_tower

    with tempfile.TemporaryDirectory() as tower_dir:
        build_tower(tower_dir, TowerSize())
        model = build_model(config, args, tower_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.tokens), generator=generator)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :2] = -100
    pixels = torch.randn(args.batch, 3, 32, 32, generator=generator)
    ids, labels, pixels = ids.to(args.device), labels.to(args.device), pixels.to(args.device)

    def step():
        loss = model(ids, labels=labels, images=pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()

    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
    else:
        weights = _max_rss_mib()
    step()  # creates the gradients and the optimizer states: the peak of training
    peak = (torch.cuda.max_memory_allocated() - weights) / 2**20 if args.device == "cuda" else _max_rss_mib() - weights
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"trainable": sum(p.numel() for p in trainable), "total": sum(p.numel() for p in model.parameters()),
            "peak_mib": peak, "seconds": seconds}


def run_worker(config: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", config, "--device", args.device]
    for flag in ("hidden", "intermediate", "layers", "heads", "vocab", "experts", "batch", "tokens", "lora_r",
                 "lora_alpha"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_DIR, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_DIR)
    if done.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    import torch

    memory = ("peak CUDA memory allocated by the first step (gradients, AdamW states, activations) above the model"
              if args.device == "cuda" else
              "growth of the process's max RSS (getrusage) over the first step (gradients, AdamW states, "
              "activations) from its value with the model built, one fresh process per row")
    print(f"Stage-3 training step, {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"MoE-LLaVA-Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers (MoE on every "
          f"other one, {args.experts} experts, top-2), vocab {args.vocab}; batch {args.batch} x {args.tokens} tokens")
    print(f"lora: r {args.lora_r}, alpha {args.lora_alpha} on every attention and FFN Linear (one adapter per expert)")
    print(f"memory = {memory}; time = the second step")
    print()
    results = {config: run_worker(config, args) for config in CONFIGS}
    full = results["full"]
    header = (f"{'config':>6} {'trainable':>12} {'% of all':>9} {'x full':>7} {'peak MiB':>9} {'x full':>7} "
              f"{'step s':>7} {'x full':>7}")
    print(header)
    print("-" * len(header))
    for config, row in results.items():
        print(f"{config:>6} {row['trainable']:>12,} {100 * row['trainable'] / row['total']:>8.1f}% "
              f"{row['trainable'] / full['trainable']:>7.3f} {row['peak_mib']:>9.1f} "
              f"{row['peak_mib'] / full['peak_mib']:>7.3f} {row['seconds']:>7.2f} {row['seconds'] / full['seconds']:>7.2f}")


if __name__ == "__main__":
    main()
