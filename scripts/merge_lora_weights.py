"""Merge a LoRA checkpoint (stage 2 or 3 trained with --lora_enable, dense or MoE) into a plain checkpoint.

    python scripts/merge_lora_weights.py --model-path checkpoints/llavaphi-2.7b-finetune-moe-lora \
        --save-model-path checkpoints/llavaphi-2.7b-finetune-moe-merged

The adapters are merged into their Linears (W + alpha/r * B A; each expert's into that expert) over the base
model recorded in the checkpoint's adapter_config.json, or `--model-base`. The result is an ordinary
checkpoint (safetensors, config, tokenizer) that loads, trains further (e.g. stage 3 after a LoRA stage 2)
and serves without peft; its outputs equal the LoRA checkpoint's.
"""

import argparse
import contextlib
import logging
import os
import sys

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_DIR not in sys.path:
    sys.path.insert(0, REPO_DIR)

from moellava.errors import run_main  # noqa: E402
from moellava.model import lora  # noqa: E402

# DeepSpeed (imported by the MoE layers) creates its loggers on stdout.
with contextlib.redirect_stdout(sys.stderr):
    from moellava.model.builder import DTYPES, load_pretrained_model  # noqa: E402

logger = logging.getLogger("moellava.merge_lora_weights")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="the LoRA checkpoint folder (it has adapter_config.json)")
    parser.add_argument("--model-base", default=None,
                        help="the model the LoRA run started from (default: the one its adapter_config.json records)")
    parser.add_argument("--save-model-path", required=True, help="new folder for the merged checkpoint")
    parser.add_argument("--torch-dtype", default="float32", choices=sorted(DTYPES),
                        help="precision the weights are merged and saved in (default float32)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not lora.is_lora_checkpoint(args.model_path):
        raise ValueError(f"--model-path {args.model_path} has no {lora.ADAPTER_CONFIG_FILE}: it is not a LoRA "
                         "checkpoint (a full checkpoint needs no merging).")
    target = args.save_model_path
    if os.path.isdir(target) and os.listdir(target):
        raise ValueError(f"--save-model-path {target} exists and is not empty: pass a new folder (files left there, "
                         f"such as an {lora.ADAPTER_CONFIG_FILE}, would mix with the merged checkpoint).")
    tokenizer, model, _, _ = load_pretrained_model(args.model_path, args.model_base, device="cpu",
                                                   torch_dtype=args.torch_dtype, merge=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    logger.info("Merged %s into %s", args.model_path, target)


if __name__ == "__main__":
    run_main(main)
