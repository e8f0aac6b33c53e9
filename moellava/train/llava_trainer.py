"""LLaVATrainer: the HF Trainer plus what LLaVA / MoE-LLaVA training needs.

- batches grouped by modality and length (`--group_by_modality_length`), data order reproducible from the
  seed and the step, so a resumed run sees the same batches;
- a separate learning rate for the projector (`--mm_projector_lr`) and DeepSpeed-MoE optimizer groups;
- the LM loss and the MoE load-balancing loss logged apart, the latter also per MoE layer (unweighted,
  about 1 when balanced, so a total of "about the number of layers" reads as balanced, not as stuck);
- routing statistics per MoE layer i, averaged over the logging window: `routing/moe_layer_{i}/expert_{j}`
  (share of the layer's token-choices routed to expert j, before capacity dropping), `.../dropped`
  (fraction of token-choices dropped for capacity) and `.../balance` (`moe.load_balance` of the shares:
  1 = even). They go wherever the Trainer logs go (console, trainer_state.json, `--report_to tensorboard`
  as per-expert scalars); recording them costs a few tensor additions per step, no device sync;
- Stage 1 (`--tune_mm_mlp_adapter`) saves only the projector, in checkpoints too; those checkpoints still
  hold the optimizer, scheduler and RNG states and resume;
- a model with LoRA adapters (`--lora_enable`) saves, in checkpoints too, the adapter and the other trained
  tensors (`moellava.model.lora`) instead of the full weights, and resumes from them;
- skipped bad samples (`--skip_bad_samples`) reported at the end and kept in every checkpoint;
- expert-parallel MoE weights gathered before saving, so checkpoints load on one process;
- checkpoints that are complete or ignored (`checkpointing`): a completion marker written last, by rank 0
  once every rank has written, and older checkpoints deleted only after it; a full disk named as such.
"""

import logging
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import RandomSampler, Sampler
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from moellava.model import lora
from moellava.model.moe import load_balance, moe_blocks
from moellava.train import checkpointing
from moellava.train.dataset import SkipReport

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "mm_projector.bin"
_SHARES = "tokens_per_expert"  # the key under which a layer's expert shares accumulate between logs
SKIP_REPORT_FILE = "skipped_samples.json"


# ----------------------------------------------------------------------------------------------------------
# Sampling


def split_to_even_chunks(indices: List[int], lengths: List[int], num_chunks: int) -> List[List[int]]:
    """Split `indices` into `num_chunks` chunks of equal size with similar total length (longest first,
    each to the currently shortest chunk); strided when the count does not divide."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: List[List[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def get_length_grouped_indices(
    lengths: List[int], batch_size: int, world_size: int, generator: torch.Generator
) -> List[int]:
    """A random permutation cut into megabatches of `world_size * batch_size`; each megabatch is sorted by
    length and split evenly over the ranks, so each batch holds samples of similar length."""
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    result = []
    for start in range(0, len(indices), size):
        megabatch = sorted(indices[start:start + size], key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(megabatch, lengths, world_size):
            result.extend(chunk)
    return result


def get_modality_length_grouped_indices(
    lengths: List[int], batch_size: int, world_size: int, generator: torch.Generator
) -> List[int]:
    """Like `get_length_grouped_indices`, but image samples (length > 0) and text-only samples (length < 0)
    never share a megabatch, except the one made of both modalities' leftovers, which comes last."""
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero: positive with images, negative without.")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return get_length_grouped_indices([abs(x) for x in lengths], batch_size, world_size, generator)
    mm = [(i, x) for i, x in enumerate(lengths) if x > 0]
    text = [(i, -x) for i, x in enumerate(lengths) if x < 0]
    size = world_size * batch_size
    megabatches, leftovers = [], []
    for group in (mm, text):
        order = get_length_grouped_indices([x for _, x in group], batch_size, world_size, generator)
        shuffled = [group[i][0] for i in order]
        batches = [shuffled[start:start + size] for start in range(0, len(shuffled), size)]
        if len(batches[-1]) < size:
            leftovers.extend(batches.pop())
        megabatches.extend(batches)
    order = torch.randperm(len(megabatches), generator=generator).tolist()
    megabatches = [megabatches[i] for i in order]
    if leftovers:
        megabatches.append(sorted(leftovers))
    return [i for megabatch in megabatches for i in megabatch]


class LengthGroupedSampler(Sampler):
    """Indices grouped by (modality and) length; its own generator, seeded once, advances one permutation
    per epoch, so the order depends only on the seed and the epoch."""

    def __init__(self, batch_size: int, world_size: int, lengths: List[int], seed: int,
                 group_by_modality: bool = True):
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = list(lengths)
        self.group_by_modality = group_by_modality
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        group = get_modality_length_grouped_indices if self.group_by_modality else get_length_grouped_indices
        lengths = self.lengths if self.group_by_modality else [abs(x) for x in self.lengths]
        return iter(group(lengths, self.batch_size, self.world_size, self.generator))


# ----------------------------------------------------------------------------------------------------------
# Optimizer groups


def optimizer_param_groups(model, weight_decay: float, mm_projector_lr: Optional[float]) -> List[dict]:
    """Named groups of the trainable parameters: weight decay except on biases and norm weights (1-D
    tensors), the projector apart when it has its own learning rate, DeepSpeed-MoE expert parameters in
    groups of their own (DeepSpeed reduces them over the expert-data-parallel group). No empty group."""
    groups: Dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2
        projector = mm_projector_lr is not None and "mm_projector" in name
        key = ("decay" if decay else "no_decay") + ("_proj" if projector else "") + "_parameters"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "weight_decay": weight_decay if decay else 0.0}
            if projector:
                groups[key]["lr"] = mm_projector_lr
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("No parameter requires grad: nothing to train. Check --train_modules / --tune_mm_mlp_adapter.")
    param_groups = list(groups.values())
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if any(is_moe_param(p) for group in param_groups for p in group["params"]):
        param_groups = split_params_into_different_moe_groups_for_optimizer(param_groups)
    # DeepSpeed drops empty groups, which leaves the LR scheduler with too many base LRs.
    return [group for group in param_groups if group["params"]]


# ----------------------------------------------------------------------------------------------------------
# The trainer


class _AllStepsTrained(Exception):
    """Raised before a step beyond max_steps: transformers 4.31 resumed from a checkpoint at max_steps
    (with --max_steps ending mid-epoch) would train one more step."""


class LLaVATrainer(Trainer):
    """`skip_report`: the dataset's SkipReport (bad samples, `--skip_bad_samples`). `projector_only_keys`:
    Stage 1 (`--tune_mm_mlp_adapter`): the substrings of the weight names saved, instead of the full model."""

    def __init__(self, *args, skip_report: Optional[SkipReport] = None,
                 projector_only_keys: Optional[Sequence[str]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            # DeepSpeed accumulates gradients itself; accelerate's `no_sync` between micro-batches (which
            # transformers 4.31 enters for gradient accumulation) is refused by ZeRO-2.
            self.accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = True
        self.skip_report = skip_report
        self.projector_only_keys = tuple(projector_only_keys) if projector_only_keys else None
        self._loss_sums: Dict[str, torch.Tensor] = {}
        self._loss_count = 0
        self._moe_blocks = moe_blocks(self.model)

    # --- data ---------------------------------------------------------------------------------------------
    def _get_train_sampler(self) -> Optional[Sampler]:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.args.group_by_modality_length:
            return LengthGroupedSampler(
                self.args.train_batch_size,
                world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                lengths=self.train_dataset.modality_lengths,
                seed=seed,
                group_by_modality=True,
            )
        generator = torch.Generator()
        generator.manual_seed(seed)
        return RandomSampler(self.train_dataset, generator=generator)

    # --- optimizer ----------------------------------------------------------------------------------------
    def create_optimizer(self):
        if self.optimizer is None:
            groups = optimizer_param_groups(self.model, self.args.weight_decay, self.args.mm_projector_lr)
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # --- the loop ---------------------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        except _AllStepsTrained:
            # The checkpoint's weights and state are loaded: the run is only missing its final save.
            self.is_in_train = False
            logger.info("All %d steps were trained before this checkpoint: nothing left to train.",
                        self.state.global_step)
            return TrainOutput(self.state.global_step, 0.0, {})

    def training_step(self, model, inputs):
        if self.state.global_step >= self.state.max_steps:
            raise _AllStepsTrained
        return super().training_step(model, inputs)

    # --- loss and logging ---------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False):
        skipped = inputs.pop("skipped_samples", None)
        if skipped and self.skip_report is not None:
            self.skip_report.merge(skipped)
            self.skip_report.check_budget()
        outputs = model(**inputs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if model.training:
            self._record_losses(outputs)
        return (loss, outputs) if return_outputs else loss

    def _record_losses(self, outputs) -> None:
        # A dense model's loss is its LM loss; a MoE model reports both parts.
        lm_loss = getattr(outputs, "lm_loss", None)
        values = {"lm_loss": lm_loss if lm_loss is not None else outputs["loss"]}
        if getattr(outputs, "aux_loss", None) is not None:
            values["aux_loss"] = outputs.aux_loss
        layer_losses = getattr(outputs, "moe_loss_list", None)
        if layer_losses:
            stacked = torch.stack([loss.float() for loss in layer_losses])
            values["aux_loss_per_layer"] = stacked.mean()
            for i, loss in enumerate(stacked):
                values[f"aux_loss_moe_layer_{i}"] = loss
        for i, block in enumerate(self._moe_blocks):
            counts = block.last_tokens_per_expert.float()
            values[f"routing/moe_layer_{i}/{_SHARES}"] = counts / counts.sum().clamp(min=1)
            values[f"routing/moe_layer_{i}/dropped"] = block.last_dropped_fraction
        for key, value in values.items():
            value = value.detach().float()
            self._loss_sums[key] = self._loss_sums.get(key, 0.0) + value
        self._loss_count += 1

    def log(self, logs: Dict[str, float]) -> None:
        # Training logs ("loss") come at the same step on every rank, so averaging over ranks is safe here.
        if "loss" in logs and self._loss_count:
            keys = sorted(self._loss_sums)
            values = [self._loss_sums[k].to(self.args.device).reshape(-1) for k in keys]
            means = torch.cat(values) / self._loss_count
            if dist.is_available() and dist.is_initialized() and self.args.world_size > 1:
                dist.all_reduce(means)
                means /= self.args.world_size
            flat, start = means.tolist(), 0
            for key, value in zip(keys, values):
                mean, start = flat[start:start + value.numel()], start + value.numel()
                if key.endswith(_SHARES):  # one value per expert, and their balance
                    layer = key[: -len(_SHARES)]
                    logs.update({f"{layer}expert_{j}": round(share, 4) for j, share in enumerate(mean)})
                    logs[f"{layer}balance"] = round(load_balance(torch.tensor(mean)), 4)
                else:
                    logs[key] = round(mean[0], 4)
            self._loss_sums, self._loss_count = {}, 0
        super().log(logs)

    # --- saving -------------------------------------------------------------------------------------------
    def _expert_parallel(self) -> bool:
        moe = getattr(self.model.config, "moe", None) or {}
        return bool(moe.get("moe_enable")) and moe.get("ep_size", 1) > 1 and self.args.world_size > 1

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        with checkpointing.explained_write_errors(output_dir or self.args.output_dir):
            self._save_model(output_dir, _internal_call)

    def _save_model(self, output_dir: Optional[str], _internal_call: bool) -> None:
        if self._expert_parallel():
            from moellava.model.moe import expert_parallel_state_dict

            # Collective: every rank contributes its experts; rank 0 writes the single-process layout. The
            # copies own their storage: ZeRO's flat buffers would look like shared (tied) tensors to
            # save_pretrained, which then drops them.
            state_dict = {k: v.detach().cpu().clone() for k, v in expert_parallel_state_dict(self.model).items()}
            if self.args.should_save:
                # The file holds the single-process layout, so its config must say so: it then loads in
                # one process (and a run with --ep_size N re-shards it at load).
                config = self.model.config
                trained_with = config.moe
                config.moe = {**trained_with, "ep_size": 1, "backend": "native"}
                try:
                    self._save(output_dir or self.args.output_dir, state_dict=state_dict)
                finally:
                    config.moe = trained_with
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        if lora.has_lora(self.model):
            return self._save_lora(output_dir or self.args.output_dir, state_dict)
        if self.projector_only_keys is None:
            return super()._save(output_dir, state_dict=state_dict)
        # Stage 1: only the projector is trained, so only the projector is written.
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        state_dict = state_dict if state_dict is not None else self.model.state_dict()
        projector = {key: value.detach().cpu().clone() for key, value in state_dict.items()
                     if any(part in key for part in self.projector_only_keys)}
        torch.save(projector, os.path.join(output_dir, PROJECTOR_FILE))
        self.model.config.save_pretrained(output_dir)
        logger.info("Saved the projector (%d tensors) to %s", len(projector), output_dir)

    def _save_lora(self, output_dir: str, state_dict) -> None:
        # `state_dict` is what DeepSpeed gathered, when it did; the model's own otherwise.
        lora.save_lora_checkpoint(self.model, output_dir, state_dict)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _hf_scheduler_under_deepspeed(self) -> bool:
        """With DeepSpeed and the Trainer's own LR scheduler (no "scheduler" in the DeepSpeed config), neither
        DeepSpeed's checkpoint nor transformers 4.31 saves the scheduler state (accelerate only hands
        DeepSpeed its own scheduler types): we do, or a resumed run would restart the schedule."""
        return self.is_deepspeed_enabled and "scheduler" not in self.args.hf_deepspeed_config.config

    def _save_checkpoint(self, model, trial, metrics=None):
        run_dir = self._get_output_dir(trial=trial)
        step = self.state.global_step
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        with checkpointing.explained_write_errors(folder):
            if self.args.should_save and os.path.isdir(folder):
                logger.warning("Replacing %s, left by an earlier run.", folder)
                checkpointing.discard(folder)
            self.accelerator.wait_for_everyone()
            super()._save_checkpoint(model, trial, metrics=metrics)
            if self._hf_scheduler_under_deepspeed() and self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(folder, SCHEDULER_NAME))
            if self.skip_report is not None:
                self.save_skip_report(folder)
            # Every rank has written its part (DeepSpeed shards, RNG states) before the checkpoint is complete.
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                checkpointing.mark_complete(folder, step)
                checkpointing.rotate(run_dir, self.args.save_total_limit, protect=[self.state.best_model_checkpoint])

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        """The Trainer would delete older checkpoints before this one is complete; `_save_checkpoint`
        rotates once the completion marker is written (checkpointing.rotate)."""

    def save_skip_report(self, folder: str) -> None:
        """Gather the skipped samples of every rank; rank 0 writes them to `folder`/skipped_samples.json."""
        if self.skip_report is None:
            return
        if dist.is_available() and dist.is_initialized() and self.args.world_size > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.skip_report.records)
            for records in gathered:
                self.skip_report.merge(records)
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            self.skip_report.save(os.path.join(folder, SKIP_REPORT_FILE))

    # --- resuming -----------------------------------------------------------------------------------------
    def load_skip_report(self, checkpoint: str) -> None:
        """Count again what a resumed run had skipped before its checkpoint."""
        report = os.path.join(checkpoint, SKIP_REPORT_FILE)
        if self.skip_report is not None and os.path.isfile(report):
            self.skip_report.load(report)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model or self.model
        if lora.has_lora(model):
            return self._load_lora(resume_from_checkpoint, model)
        if lora.is_lora_checkpoint(resume_from_checkpoint):
            raise ValueError(
                f"{resume_from_checkpoint} is a checkpoint of a LoRA run (adapters only), and this run trains "
                "without LoRA: resume with --lora_enable True and the LoRA settings of the run that wrote it."
            )
        if self.projector_only_keys is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        path = os.path.join(resume_from_checkpoint, PROJECTOR_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"{resume_from_checkpoint} has no {PROJECTOR_FILE}: it is not a Stage-1 checkpoint. Remove it, or "
                "use a different --output_dir."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        expected = {key for key in model.state_dict() if any(part in key for part in self.projector_only_keys)}
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys or expected - set(state):
            raise ValueError(
                f"{path} does not fit this model: unexpected keys {result.unexpected_keys}, missing "
                f"{sorted(expected - set(state))}. Resume with the arguments of the run that wrote it."
            )
        logger.info("Resumed the projector from %s", path)

    def _load_lora(self, checkpoint: str, model) -> None:
        """Resume the adapters and the other trained tensors (the frozen weights are the base's, unchanged)."""
        if not lora.is_lora_checkpoint(checkpoint):
            raise ValueError(
                f"{checkpoint} has no {lora.ADAPTER_CONFIG_FILE}: it is not a checkpoint of a LoRA run. Resume with "
                "the arguments of the run that wrote it, or use a different --output_dir."
            )
        loaded = lora.load_lora_weights(model, checkpoint)
        expected = set(lora.split_lora_state(model, model.state_dict())[1])
        if loaded != expected:
            raise ValueError(
                f"{checkpoint}/{lora.NON_LORA_FILE} holds {sorted(loaded - expected)[:5]} and lacks "
                f"{sorted(expected - loaded)[:5]} of what this run trains: resume with the arguments of the run "
                "that wrote it."
            )
        logger.info("Resumed the LoRA adapters and %d other trained tensors from %s", len(loaded), checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self._hf_scheduler_under_deepspeed():
            path = os.path.join(checkpoint, SCHEDULER_NAME)
            if not os.path.isfile(path):
                raise ValueError(
                    f"{checkpoint} has no {SCHEDULER_NAME}, so the learning-rate schedule cannot resume. It was not "
                    "written by this trainer: remove it or pass --overwrite_output_dir True to start afresh."
                )
            self.lr_scheduler.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def _load_rng_state(self, checkpoint):
        # Our own rng_state.pth files hold numpy's RNG state next to tensors; allow exactly those types.
        with torch.serialization.safe_globals(checkpointing.NUMPY_RNG_GLOBALS):
            super()._load_rng_state(checkpoint)
