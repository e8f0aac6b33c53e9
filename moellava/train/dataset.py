"""Training data: LLaVA-format JSON files -> tokenized samples with their images -> padded batches.

A sample is `{"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] (optional), "conversations": [{"from":
"human"|"gpt", "value": str}, ...]}`, with one `<image>` placeholder per image. Text-only samples mix with
image samples. Bad samples are never replaced by other ones: by default the first one stops training with
the file, the sample id and the fix; with `--skip_bad_samples True` they are skipped and counted by reason
(`SkipReport`), up to `--max_skipped_fraction` of the data. Problems that need no image decoding or
tokenization (an image file that does not exist, a placeholder count that does not match the images, a
sample without conversations) are found when the dataset is built, before training starts; corrupt images
and conversations that cannot be tokenized are found when the sample is first loaded.
"""

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from moellava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from moellava.mm_utils import preprocess_image
from moellava.train.preprocess import PreprocessError, preprocess, preprocess_multimodal

logger = logging.getLogger(__name__)

SKIP_HINT = "or pass --skip_bad_samples True to skip and count such samples"

# Reasons a sample is skipped; preprocess errors add "preprocess_<kind>" (format, mismatch, truncated, no_labels).
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
MALFORMED_SAMPLE = "malformed_sample"


class DataFormatError(ValueError):
    """A data file that cannot be read at all (malformed JSON, not a list of samples). Always fatal."""


@dataclass(frozen=True)
class SampleRef:
    """Where a sample comes from: its file, its position there and its id (the data's own `id`, else
    `<file name>#<index>`)."""

    file: str
    index: int
    sample_id: object


@dataclass(frozen=True)
class SkipRecord:
    """A skipped sample: where it is, why (`reason`) and the details."""

    file: str
    index: int
    sample_id: object
    reason: str
    detail: str


class BadSampleError(ValueError):
    """A sample that cannot become training data; the message names the file, the sample and the fix."""

    def __init__(self, ref: SampleRef, reason: str, detail: str):
        self.ref = ref
        self.record = SkipRecord(ref.file, ref.index, ref.sample_id, reason, detail)
        super().__init__(
            f"{ref.file}: sample {ref.sample_id!r} (entry {ref.index}): {detail}. Fix the sample in the data file, "
            f"{SKIP_HINT}."
        )


class SkipReport:
    """Skipped samples, counted once each (by file and position) and by reason."""

    def __init__(self, total_samples: int, max_fraction: float):
        self.total_samples = total_samples
        self.max_fraction = max_fraction
        self._records: Dict[tuple, SkipRecord] = {}

    def add(self, record: SkipRecord) -> None:
        self._records.setdefault((record.file, record.index), record)

    def merge(self, records: Sequence[SkipRecord]) -> None:
        for record in records:
            self.add(record)

    @property
    def records(self) -> List[SkipRecord]:
        return sorted(self._records.values(), key=lambda r: (r.file, r.index))

    def __len__(self) -> int:
        return len(self._records)

    def counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for record in self._records.values():
            counts[record.reason] = counts.get(record.reason, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def budget(self) -> int:
        """How many samples may be skipped: max_fraction of the data, rounded down."""
        return int(self.max_fraction * self.total_samples)

    def check_budget(self) -> None:
        if len(self) > self.budget:
            first = self.records[0]
            raise ValueError(
                f"{len(self)} of {self.total_samples} samples are bad ({self.counts()}), more than "
                f"--max_skipped_fraction {self.max_fraction} allows ({self.budget}). The data needs fixing; "
                f"the first one: {first.file}: sample {first.sample_id!r} (entry {first.index}): {first.detail}. "
                "Raise --max_skipped_fraction only if losing these samples is acceptable."
            )

    def to_dict(self) -> dict:
        return {
            "total_samples": self.total_samples,
            "skipped": len(self),
            "by_reason": self.counts(),
            "samples": [asdict(record) for record in self.records],
        }

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, default=str)
            f.write("\n")

    def load(self, path: str) -> None:
        """Add the records of a report saved by `save` (resuming keeps what was skipped before)."""
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        self.merge([SkipRecord(**record) for record in saved["samples"]])

    def summary(self) -> str:
        if not self:
            return f"no bad samples among {self.total_samples}"
        return f"skipped {len(self)} of {self.total_samples} samples: {self.counts()}"


def load_data_file(path: str) -> list:
    """A JSON file holding a list of samples; malformed JSON fails with its line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataFormatError(f"--data_path {path}: no such file.") from None
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}. Fix the file "
            "(it must hold one JSON list of samples)."
        ) from None
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err}). Save the data file as UTF-8 JSON.") from None
    if not isinstance(data, list):
        raise DataFormatError(
            f"{path}: the top level is a JSON {type(data).__name__}, expected a list of samples "
            '([{"id": ..., "image": ..., "conversations": [...]}, ...]).'
        )
    return data


@dataclass
class _Sample:
    ref: SampleRef
    images: List[str]
    conversations: list
    length: int  # text words + image tokens, an estimate of the sequence length


class LazySupervisedDataset(Dataset):
    """Samples of one or more JSON files; images are read and conversations tokenized on access.

    `image_processor` is the tower's processor (None for a model without image tower: then any sample with
    an image is an error); `tokens_per_image` is the number of LLM tokens one image becomes, used for the
    length estimates the modality-grouped sampler uses.
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
    ):
        super().__init__()
        if isinstance(data_path, str):
            data_path = [data_path]
        self.tokenizer = tokenizer
        self.image_folder = data_args.image_folder
        self.image_aspect_ratio = data_args.image_aspect_ratio
        self.skip_bad_samples = data_args.skip_bad_samples
        self.image_processor = image_processor
        self.tokens_per_image = tokens_per_image
        self.mm_use_im_start_end = mm_use_im_start_end

        self.samples: List[_Sample] = []
        problems: List[BadSampleError] = []
        total = 0
        for path in data_path:
            for index, item in enumerate(load_data_file(path)):
                total += 1
                try:
                    self.samples.append(self._check_sample(path, index, item))
                except BadSampleError as err:
                    problems.append(err)
        self.skip_report = SkipReport(total, data_args.max_skipped_fraction)
        self.skip_report.merge([p.record for p in problems])
        if problems and not self.skip_bad_samples:
            first = problems[0]
            others = ""
            if len(problems) > 1:
                others = f" ({len(problems)} of {total} samples have problems: {self.skip_report.counts()})"
            raise BadSampleError(first.ref, first.record.reason, first.record.detail + others)
        if problems:
            logger.warning("Data check: %s (bad samples are listed at the end of training).", self.skip_report.summary())
        self.skip_report.check_budget()
        if not self.samples:
            raise ValueError(f"--data_path {list(data_path)} holds no usable sample.")

    def _check_sample(self, path: str, index: int, item) -> _Sample:
        sample_id = item.get("id") if isinstance(item, dict) else None
        ref = SampleRef(path, index, f"{os.path.basename(path)}#{index}" if sample_id is None else sample_id)
        if not isinstance(item, dict):
            raise BadSampleError(ref, MALFORMED_SAMPLE, f"a sample must be a JSON object, got {type(item).__name__}")
        if "video" in item:
            raise BadSampleError(ref, MALFORMED_SAMPLE, "video samples are not supported (no video tower)")
        conversations = item.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise BadSampleError(ref, MALFORMED_SAMPLE, "it has no 'conversations' list")
        if not all(isinstance(turn, dict) and isinstance(turn.get("value"), str) for turn in conversations):
            raise BadSampleError(
                ref, MALFORMED_SAMPLE, "every turn must be an object with a string 'value' (and 'from')"
            )

        images = item.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
            raise BadSampleError(ref, MALFORMED_SAMPLE, f"'image' must be a path or a list of paths, got {images!r}")
        placeholders = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in conversations)
        if placeholders != len(images):
            raise BadSampleError(
                ref,
                IMAGE_COUNT_MISMATCH,
                f"{placeholders} {DEFAULT_IMAGE_TOKEN} placeholder(s) in the conversation but {len(images)} "
                "image(s): each image needs exactly one <image> in the text",
            )
        if images and self.image_processor is None:
            raise ValueError(
                f"{path}: sample {ref.sample_id!r} has an image but the model has no image tower. Pass "
                "--image_tower (e.g. openai/clip-vit-large-patch14-336) or train on text-only data."
            )
        for image in images:
            if not os.path.isfile(self._image_path(image)):
                raise BadSampleError(
                    ref, MISSING_IMAGE, f"image {self._image_path(image)!r} does not exist (check --image_folder)"
                )
        words = sum(len(turn["value"].replace(DEFAULT_IMAGE_TOKEN, " ").split()) for turn in conversations)
        return _Sample(ref, images, conversations, max(words, 1) + len(images) * self.tokens_per_image)

    def _image_path(self, image: str) -> str:
        return os.path.join(self.image_folder, image) if self.image_folder else image

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> List[int]:
        """Estimated sequence length of each sample (text words + image tokens)."""
        return [sample.length for sample in self.samples]

    @property
    def modality_lengths(self) -> List[int]:
        """As `lengths`, positive for samples with images and negative for text-only ones."""
        return [sample.length if sample.images else -sample.length for sample in self.samples]

    def _load_image(self, ref: SampleRef, image: str) -> torch.Tensor:
        path = self._image_path(image)
        try:
            with Image.open(path) as opened:
                picture = opened.convert("RGB")
        except FileNotFoundError:
            raise BadSampleError(ref, MISSING_IMAGE, f"image {path!r} does not exist (check --image_folder)") from None
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise BadSampleError(ref, CORRUPT_IMAGE, f"image {path!r} cannot be decoded ({err})") from None
        return preprocess_image(picture, self.image_processor, self.image_aspect_ratio)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        try:
            return self._build(sample)
        except BadSampleError as err:
            if not self.skip_bad_samples:
                raise
            return {"skipped": err.record}

    def _build(self, sample: _Sample) -> dict:
        ref = sample.ref
        images = [self._load_image(ref, image) for image in sample.images]
        sources = [copy.deepcopy(sample.conversations)]
        try:
            if self.image_processor is not None:
                sources = preprocess_multimodal(
                    sources, mm_use_im_start_end=self.mm_use_im_start_end, sample_ids=[ref.sample_id]
                )
            data = preprocess(sources, self.tokenizer, has_image=bool(images), sample_ids=[ref.sample_id])
        except PreprocessError as err:
            raise BadSampleError(ref, f"preprocess_{err.kind}", err.reason) from None
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
                f"Every sample of this batch was bad and skipped ({ids}), so there is nothing to train on. Fix "
                "these samples, or use a larger --per_device_train_batch_size."
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
    tokenizer, data_args, *, image_processor=None, tokens_per_image: int = 0, mm_use_im_start_end: bool = False
) -> dict:
    """The Trainer's `train_dataset` and `data_collator` (no eval set, as in the original recipes)."""
    dataset = LazySupervisedDataset(
        data_args.data_path,
        tokenizer,
        data_args,
        image_processor=image_processor,
        tokens_per_image=tokens_per_image,
        mm_use_im_start_end=mm_use_im_start_end,
    )
    return {
        "train_dataset": dataset,
        "eval_dataset": None,
        "data_collator": DataCollatorForSupervisedDataset(tokenizer=tokenizer),
    }
