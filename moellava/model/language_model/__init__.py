"""One file per LLM family: llava_<family>.py (dense) and llava_<family>_moe.py (MoE), plus <family>/
packages where transformers 4.31 lacks the backbone. Importing `moellava.model` registers them all."""
