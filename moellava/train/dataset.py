"""Training data: LLaVA-format JSON files -> tokenized samples with their images -> padded batches.

A sample is `{"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] (optional), "conversations": [{"from":
"human"|"gpt", "value": str}, ...]}`, with one `<image>` placeholder per image. Text-only samples mix with
image samples. Every sample is checked when the dataset is built, before training starts (`data_check`:
structure, images that exist and decode, the conversation tokenized as training does, the length with images
expanded). Bad samples are never replaced by other ones: by default the first one stops training with the
file, the sample id and the fix; with `--skip_bad_samples True` they are left out and counted by reason
(`SkipReport`), up to `--max_skipped_fraction` of the data, at any batch size.
"""

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from moellava import conversation as conversation_lib
from moellava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from moellava.mm_utils import preprocess_image
from moellava.train.data_check import (  # noqa: F401  (the dataset's errors and reports, importable from here)
    CORRUPT_IMAGE,
    MISSING_IMAGE,
    BadSampleError,
    DataFormatError,
    Sample,
    SampleChecker,
    SampleRef,
    SkipRecord,
    SkipReport,
    run_data_check,
    summary,
)

logger = logging.getLogger(__name__)


class LazySupervisedDataset(Dataset):
    """The checked samples of one or more JSON files; images are read and conversations tokenized on access.

    `image_processor` is the tower's processor and `tokens_per_image` the LLM positions one image becomes
    (None / 0 for a model without image tower: then any sample with an image is an error). `check_file`:
    where the data check keeps its result (reused when nothing changed); `progress`: show its progress bar.
    """

    def __init__(
        self,
        data_path: Sequence[str],
        tokenizer,
        data_args,
        *,
        image_processor=None,
        tokens_per_image: int = 0,
        mm_use_im_start_end: bool = False,
        check_file: Optional[str] = None,
        progress: bool = False,
    ):
        super().__init__()
        if isinstance(data_path, str):
            data_path = [data_path]
        if image_processor is not None and tokens_per_image < 1:
            raise ValueError("tokens_per_image must be the image tower's tokens per image when it has a processor.")
        self.tokenizer = tokenizer
        self.image_aspect_ratio = data_args.image_aspect_ratio
        self.skip_bad_samples = data_args.skip_bad_samples
        self.image_processor = image_processor
        self.checker = SampleChecker(
            tokenizer, conversation_lib.default_conversation, image_folder=data_args.image_folder,
            tokens_per_image=tokens_per_image if image_processor is not None else 0,
            mm_use_im_start_end=mm_use_im_start_end,
        )
        result = run_data_check(list(data_path), self.checker, workers=getattr(data_args, "data_check_workers", None),
                                progress=progress, save_path=check_file)
        self.samples: List[Sample] = result.samples
        self.notes = result.notes
        self.skip_report = SkipReport(result.total, data_args.max_skipped_fraction)
        self.skip_report.merge([problem.record for problem in result.problems])
        logger.info("Data check: %s.", summary(result))
        if result.problems and not self.skip_bad_samples:
            first = result.problems[0]
            others = ""
            if len(result.problems) > 1:
                others = f" ({len(result.problems)} of {result.total} samples have problems: {self.skip_report.counts()})"
            raise BadSampleError(first.ref, first.record.reason, first.record.detail + others)
        if result.problems:
            logger.warning("Data check: %s (listed in skipped_samples.json at the end of training).",
                           self.skip_report.summary())
        self.skip_report.check_budget()
        if not self.samples:
            raise ValueError(f"--data_path {list(data_path)} holds no usable sample.")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> List[int]:
        """Sequence length of each sample in the model (text tokens + image tokens)."""
        return [sample.length for sample in self.samples]

    @property
    def modality_lengths(self) -> List[int]:
        """As `lengths`, positive for samples with images and negative for text-only ones."""
        return [sample.length if sample.images else -sample.length for sample in self.samples]

    def _load_image(self, ref: SampleRef, image: str) -> torch.Tensor:
        path = self.checker.image_path(image)
        try:
            with Image.open(path) as opened:
                picture = opened.convert("RGB")
        except FileNotFoundError:
            raise BadSampleError(ref, MISSING_IMAGE, f"image {path!r} no longer exists (it did when the data was "
                                 "checked before training)") from None
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise BadSampleError(ref, CORRUPT_IMAGE, f"image {path!r} cannot be decoded any more ({err}); it could "
                                 "be when the data was checked before training") from None
        return preprocess_image(picture, self.image_processor, self.image_aspect_ratio)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        try:
            images = [self._load_image(sample.ref, image) for image in sample.images]
            data = self.checker.tokenize(sample)
        except BadSampleError as err:
            # Only a file changed since the check gets here.
            if not self.skip_bad_samples:
                raise
            return {"skipped": err.record}
        return {"input_ids": data["input_ids"][0], "labels": data["labels"][0], "images": images}


@dataclass
class DataCollatorForSupervisedDataset:
    """Pad a list of samples into a batch.

    `input_ids` are padded with the pad id and `labels` with IGNORE_INDEX, both cut to
    `tokenizer.model_max_length`; `attention_mask` comes from the sequence lengths (a pad id that is also
    a real token, as when pad = unk, stays attended where it is real). `images` is the flat list of the
    batch's image tensors, one per `<image>` placeholder in order, and is absent when the batch has none.
    Skipped samples (`--skip_bad_samples`) leave the batch and travel in `skipped_samples` for the report.
    """

    tokenizer: object

    def __call__(self, instances: Sequence[dict]) -> dict:
        skipped = [instance["skipped"] for instance in instances if "skipped" in instance]
        instances = [instance for instance in instances if "skipped" not in instance]
        if not instances:
            ids = ", ".join(f"{r.file}: {r.sample_id!r} ({r.reason})" for r in skipped)
            raise ValueError(
                f"Every sample of this batch was skipped ({ids}): their files changed after the data check "
                "before training, so there is nothing to train on. Fix these files and run again (the run "
                "resumes from its last checkpoint)."
            )
        max_length = self.tokenizer.model_max_length
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token; load it with moellava.tokenization.load_tokenizer.")
        input_ids = [instance["input_ids"][:max_length] for instance in instances]
        labels = [instance["labels"][:max_length] for instance in instances]
        length = max(ids.shape[0] for ids in input_ids)
        batch_ids = torch.full((len(instances), length), pad_id, dtype=torch.long)
        batch_labels = torch.full((len(instances), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(instances), length), dtype=torch.long)
        images = []
        for row, (ids, target, instance) in enumerate(zip(input_ids, labels, instances)):
            batch_ids[row, : ids.shape[0]] = ids
            batch_labels[row, : target.shape[0]] = target
            attention_mask[row, : ids.shape[0]] = 1
            # A placeholder cut by truncation takes its image with it, so images and placeholders stay paired.
            images.extend(instance.get("images", [])[: int((ids == IMAGE_TOKEN_INDEX).sum())])
        batch = {"input_ids": batch_ids, "labels": batch_labels, "attention_mask": attention_mask}
        if images:
            batch["images"] = images
        if skipped:
            batch["skipped_samples"] = skipped
        return batch


def make_supervised_data_module(
    tokenizer, data_args, *, image_processor=None, tokens_per_image: int = 0, mm_use_im_start_end: bool = False,
    check_file: Optional[str] = None, progress: bool = False,
) -> dict:
    """The Trainer's `train_dataset` and `data_collator` (no eval set, as in the original recipes)."""
    dataset = LazySupervisedDataset(
        data_args.data_path,
        tokenizer,
        data_args,
        image_processor=image_processor,
        tokens_per_image=tokens_per_image,
        mm_use_im_start_end=mm_use_im_start_end,
        check_file=check_file,
        progress=progress,
    )
    return {
        "train_dataset": dataset,
        "eval_dataset": None,
        "data_collator": DataCollatorForSupervisedDataset(tokenizer=tokenizer),
    }
