"""The original's name for merging a MoE LoRA checkpoint: the same as scripts/merge_lora_weights.py (which
merges dense and MoE LoRA checkpoints alike), kept so that the original's commands run unchanged."""

import os
import runpy

if __name__ == "__main__":
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "merge_lora_weights.py"),
                   run_name="__main__")
