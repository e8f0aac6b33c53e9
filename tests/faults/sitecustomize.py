"""Fault injection for tests/test_checkpoint_faults.py: imported at interpreter start-up when this folder is
on PYTHONPATH; inactive unless MOELLAVA_TEST_FAULT is set.

MOELLAVA_TEST_FAULT="<point>@<where>[:<n>][:partial]" SIGKILLs the process at the n-th (default first) time
the point is reached:
  step@<N>             the start of training step N (Trainer.training_step; one call per step without
                       gradient accumulation)
  torch_save@<folder>  a torch.save into a file of <folder> ("final" = the output folder itself), before
                       anything is written; with :partial after writing half of the bytes
  safetensors@<folder> a safetensors save_file into <folder>; with :partial after truncating it to half
  state_json@<folder>  just after trainer_state.json is written into <folder>
  marker@<folder>      just after the completion marker of <folder> is written (before older checkpoints
                       are deleted)
  rmtree@<folder>      when the deletion of <folder> starts (it has been renamed out of the way)
  unlink@<folder>      at the n-th file removed while <folder> is being deleted
"""

import os

SPEC = os.environ.get("MOELLAVA_TEST_FAULT")

if SPEC:
    import io
    import shutil
    import signal

    POINT, _, REST = SPEC.partition("@")
    WHERE, *OPTIONS = REST.split(":")
    NTH = next((int(option) for option in OPTIONS if option.isdigit()), 1)
    PARTIAL = "partial" in OPTIONS
    counts = {"n": 0}

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def reached() -> bool:
        counts["n"] += 1
        return counts["n"] == NTH

    def folder_matches(path) -> bool:
        parents = os.path.abspath(str(path)).split(os.sep)[:-1]
        if WHERE == "final":
            return not any(part.startswith(("checkpoint-", "global_step")) for part in parents[-2:])
        return WHERE in parents

    if POINT == "step":
        import transformers

        original_step = transformers.Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step + 1 == int(WHERE):
                kill()
            return original_step(self, *args, **kwargs)

        transformers.Trainer.training_step = training_step

    elif POINT == "torch_save":
        import torch

        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and folder_matches(f) and reached():
                if PARTIAL:
                    buffer = io.BytesIO()
                    original_save(obj, buffer, *args, **kwargs)
                    with open(f, "wb") as out:
                        out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                kill()
            return original_save(obj, f, *args, **kwargs)

        torch.save = save

    elif POINT == "safetensors":
        import safetensors.torch

        original_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, *args, **kwargs):
            result = original_save_file(tensors, filename, *args, **kwargs)
            if folder_matches(filename) and reached():
                if PARTIAL:
                    os.truncate(filename, os.path.getsize(filename) // 2)
                kill()
            return result

        safetensors.torch.save_file = save_file

    elif POINT == "state_json":
        from transformers.trainer_callback import TrainerState

        original_save_to_json = TrainerState.save_to_json

        def save_to_json(self, json_path):
            original_save_to_json(self, json_path)
            if folder_matches(json_path) and reached():
                kill()

        TrainerState.save_to_json = save_to_json

    elif POINT == "marker":
        from moellava.train import checkpointing

        original_mark_complete = checkpointing.mark_complete

        def mark_complete(folder, step):
            original_mark_complete(folder, step)
            if os.path.basename(folder) == WHERE and reached():
                kill()

        checkpointing.mark_complete = mark_complete

    elif POINT in ("rmtree", "unlink"):
        original_rmtree = shutil.rmtree
        original_unlink = os.unlink
        deleting = {"active": False}

        def rmtree(path, *args, **kwargs):
            target = os.path.basename(str(path))
            if target.startswith(f".trash-{WHERE}-"):
                if POINT == "rmtree" and reached():
                    kill()
                deleting["active"] = True
            try:
                return original_rmtree(path, *args, **kwargs)
            finally:
                deleting["active"] = False

        def unlink(path, *args, **kwargs):
            if deleting["active"] and reached():
                kill()
            return original_unlink(path, *args, **kwargs)

        shutil.rmtree = rmtree
        if POINT == "unlink":
            os.unlink = unlink
    else:
        raise ValueError(f"MOELLAVA_TEST_FAULT={SPEC!r}: unknown fault point {POINT!r}")
