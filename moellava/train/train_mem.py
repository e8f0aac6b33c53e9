"""The original MoE-LLaVA scripts' entry point (`deepspeed moellava/train/train_mem.py ...`): the same `train()`
as train.py. The original patched Llama's attention with flash-attn here; nothing is patched in this project."""

import sys

from moellava.errors import run_main
from moellava.train.train import train

if __name__ == "__main__":
    run_main(train, sys.argv[1:])
