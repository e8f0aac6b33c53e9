"""Checkpoints that are complete or ignored, and resuming from the newest complete one.

A kill can come at any moment: while the weights or optimizer states are being written, after the Trainer's
`trainer_state.json` but before the files written after it, while an older checkpoint is being deleted.
The rules that make every such moment safe:

- `checkpoint-N/checkpoint_complete.json` is written last, once every rank has written its files; it lists
  every file of the checkpoint with its size. It is written to a temporary name, flushed to disk and renamed,
  so it either exists whole or not at all. A checkpoint without it, or whose files no longer match it, is
  incomplete: resuming skips it with a warning and takes the newest complete one.
- Older checkpoints are deleted only after the new one is complete. A deletion first renames the folder out
  of the `checkpoint-*` namespace (`.trash-checkpoint-N-*`, one atomic rename), so a half-deleted folder is
  never mistaken for a checkpoint; leftovers are removed at the next start.
- Before a checkpoint is written, a folder of the same name left by an earlier, interrupted run is moved
  out of the way, so no stale file survives in the new one.
- Resuming reads pickled states (DeepSpeed's `*_states.pt`, the Trainer's `*.pt` / `*.pth`) only after
  checking that every object in them is a tensor, a plain container or one of a short list of known classes
  (`torch.load(weights_only=True)` with `SAFE_CHECKPOINT_GLOBALS`): a planted pickle cannot run code.
"""

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import shutil
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
TRASH_PREFIX = ".trash-"
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# Files in a checkpoint that are never read when resuming (the Trainer pickles its arguments for humans).
NOT_LOADED_ON_RESUME = ("training_args.bin",)


# What numpy's RNG state pickles into: the Trainer's rng_state*.pth hold it next to torch's state.
NUMPY_RNG_GLOBALS = [np.dtype, np.ndarray, np._core.multiarray._reconstruct, type(np.dtype(np.uint32))]


def safe_checkpoint_globals() -> list:
    """The non-tensor classes pickled into the states this trainer and DeepSpeed ZeRO write: numpy's RNG
    state, DeepSpeed's loss scalers, the ZeRO stage and the fp32 partition addresses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return NUMPY_RNG_GLOBALS + [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class CheckpointRefusedError(ValueError):
    """A checkpoint marked complete that must not be loaded: a pickled file holds objects outside the
    allow-list (loading it could run code), or a file changed after it was written."""


# --- listing -----------------------------------------------------------------------------------------------


def checkpoint_folders(output_dir: str) -> List[Tuple[int, str]]:
    """`(step, path)` of every `checkpoint-N` folder in `output_dir`, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.fullmatch(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _files(folder: str) -> Dict[str, int]:
    """Relative path -> size of every file under `folder`, the marker excepted."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != COMPLETE_MARKER and not name.startswith(f"{COMPLETE_MARKER}."):
                sizes[relative] = os.path.getsize(path)
    return sizes


def incomplete_reason(folder: str) -> Optional[str]:
    """None for a completely written checkpoint, else why it is not one."""
    marker = os.path.join(folder, COMPLETE_MARKER)
    if not os.path.isfile(marker):
        return f"no {COMPLETE_MARKER} (it was cut short while being written)"
    try:
        with open(marker, encoding="utf-8") as f:
            listed = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {COMPLETE_MARKER} cannot be read ({err})"
    present = _files(folder)
    for relative, size in sorted(listed.items()):
        if relative not in present:
            return f"{relative} is missing"
        if present[relative] != size:
            return f"{relative} has {present[relative]} bytes, {size} when it was written"
    return None


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete `checkpoint-N` of `output_dir`; newer incomplete ones are skipped with a warning."""
    for step, folder in reversed(checkpoint_folders(output_dir)):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder
        logger.warning("Skipping %s: not a complete checkpoint: %s.", folder, reason)
    return None


# --- writing -----------------------------------------------------------------------------------------------


def _fsync(path: str) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def mark_complete(folder: str, step: int) -> None:
    """Flush every file of `folder` to disk, then write its completion marker (atomically)."""
    sizes = _files(folder)
    for relative in sizes:
        _fsync(os.path.join(folder, relative))
    for root, _, _ in os.walk(folder):
        _fsync(root)
    marker = os.path.join(folder, COMPLETE_MARKER)
    temporary = f"{marker}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"step": step, "files": sizes}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, marker)
    _fsync(folder)


def discard(folder: str) -> None:
    """Delete a checkpoint folder so that no moment of the deletion leaves something that looks like one."""
    parent, name = os.path.split(folder.rstrip(os.sep))
    trash = os.path.join(parent, f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, trash)
    _fsync(parent)
    shutil.rmtree(trash)


def remove_leftovers(output_dir: str) -> None:
    """Finish deletions a kill interrupted (`.trash-*` folders)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(TRASH_PREFIX):
            logger.info("Removing %s, left by an interrupted checkpoint deletion.", name)
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def rotate(output_dir: str, keep: Optional[int], protect: Sequence[str] = ()) -> None:
    """Keep the newest `keep` complete checkpoints (all when `keep` is None or <= 0) and the `protect`ed
    ones (the best model); delete the older complete ones and every incomplete one."""
    folders = checkpoint_folders(output_dir)
    complete = [path for _, path in folders if incomplete_reason(path) is None]
    kept = {os.path.abspath(p) for p in (complete if not keep or keep <= 0 else complete[-keep:])}
    kept.update(os.path.abspath(p) for p in protect if p)
    for _, path in folders:
        if os.path.abspath(path) in kept:
            continue
        logger.info("Deleting checkpoint %s (--save_total_limit %s).", path, keep)
        discard(path)


# Below this much free space a failed write is taken for a full disk (torch.save then fails with a C++
# stream error, "basic_ios::clear: iostream error", instead of ENOSPC).
FULL_DISK_BYTES = 64 * 2**20


def _free_bytes(path: str) -> Optional[int]:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


@contextlib.contextmanager
def explained_write_errors(folder: str):
    """Turn a failed checkpoint write into an error that says what happened: a full disk, a read-only
    folder, and which complete checkpoint is still there to resume from."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        free = _free_bytes(folder)
        code = getattr(err, "errno", None)
        last = last_complete_checkpoint(os.path.dirname(folder.rstrip(os.sep)))
        keeps = f"The last complete checkpoint, {last}, is intact." if last else "No complete checkpoint exists yet."
        if code == errno.ENOSPC or (free is not None and free < FULL_DISK_BYTES):
            raise OSError(
                errno.ENOSPC,
                f"No space left on device while writing {folder} ({_size(free or 0)} free). Free disk "
                f"space or point --output_dir to a larger disk, then run the same command again. {keeps}",
            ) from err
        if code in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise OSError(code, f"Cannot write {folder}: {err.strerror}. Use a writable --output_dir. {keeps}") from err
        raise


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def check_output_dir(output_dir: str) -> None:
    """Fail before anything loads when `output_dir` cannot be created or written (every rank writes there)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{uuid.uuid4().hex}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise OSError(
            err.errno, f"--output_dir {output_dir} is not writable ({err.strerror}): checkpoints and the trained "
            "model go there. Pass a folder you can write to."
        ) from None


def report_disk_space(output_dir: str, model, keep: Optional[int]) -> None:
    """Log the free space of `output_dir` against what the checkpoints of this run take (weights, plus 12
    bytes of Adam states and fp32 master weights per trainable parameter); warn when it cannot hold them."""
    free = _free_bytes(output_dir)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    at_once = (keep if keep and keep > 0 else 1) + 1  # the new checkpoint exists before the oldest is deleted
    needed = at_once * (weights + optimizer) + weights  # and the final model
    if free is None:
        return
    line = (f"--output_dir {output_dir}: {_size(free)} free; a checkpoint takes about {_size(weights + optimizer)} "
            f"(weights {_size(weights)} + optimizer {_size(optimizer)}), up to {at_once} at once, plus the final "
            "model")
    if free < needed:
        logger.warning("%s: about %s needed. Free space or use another --output_dir, or the run will stop at a "
                       "save.", line, _size(needed))
    else:
        logger.info("%s.", line)


# --- resuming ----------------------------------------------------------------------------------------------


def check_pickles(folder: str) -> None:
    """Refuse a checkpoint whose pickled files hold anything but tensors, plain data and known classes."""
    allowed = safe_checkpoint_globals()
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if not name.endswith(PICKLE_SUFFIXES) or name in NOT_LOADED_ON_RESUME:
                continue
            path = os.path.join(root, name)
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as err:
                found = re.search(r"GLOBAL (\S+)", str(err))
                what = f"the object {found.group(1)}" if found else "an object"
                raise CheckpointRefusedError(
                    f"{path} holds {what}, which is not a tensor, plain data or a known training-state class: "
                    "loading it could execute code, so resuming from it is refused. If you did not write this "
                    f"file, delete {folder} (the run then resumes from the previous complete checkpoint) or "
                    "start afresh with --overwrite_output_dir True."
                ) from None
            except (RuntimeError, EOFError, OSError) as err:
                raise CheckpointRefusedError(
                    f"{path} cannot be read ({err}), although {folder} was marked complete: the file changed "
                    f"after it was written. Delete {folder} to resume from the previous complete checkpoint."
                ) from None
