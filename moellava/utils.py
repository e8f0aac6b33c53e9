"""Helpers of the original MoE-LLaVA's `moellava.utils` that scripts written for it import:
`disable_torch_init` (README / predict.py snippet) and the `--local_rank` argument every entry point takes."""

import argparse

import torch


def disable_torch_init() -> None:
    """Skip the random initialisation of `nn.Linear` and `nn.LayerNorm` layers for the rest of the process,
    as the original does before loading a checkpoint: building the model is faster, and every weight is
    then read from the checkpoint anyway (`load_pretrained_model` refuses one whose weights are incomplete).

    Layers built afterwards start uninitialised, so call it only in a process that loads checkpoints (not
    before training new layers)."""
    setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
    setattr(torch.nn.LayerNorm, "reset_parameters", lambda self: None)


def add_local_rank_argument(parser: argparse.ArgumentParser) -> None:
    """`--local_rank` (`--local-rank`), which the `deepspeed` launcher passes to every script it starts, as
    the original's scripts are run (`deepspeed --include localhost:0 moellava/serve/cli.py ...`); these
    entry points run in one process and do not use it."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="set by the deepspeed launcher; accepted and not used (one process)")
