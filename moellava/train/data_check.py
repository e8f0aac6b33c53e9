"""The data check: every sample of the training data is found trainable or bad in one pass, before step 1.

For each sample of each `--data_path` file (`SampleChecker`):
- structure: an object with a `conversations` list of `{"from", "value": str}` turns, valid Unicode, an
  `image` path or list of paths, one `<image>` placeholder per image, no video;
- images: each file exists and decodes (JPEGs are decoded at reduced scale, which still reads every byte);
- text: the conversation is rendered and tokenized exactly as training does (`preprocess`: roles,
  alternation, answers present, exact answer spans), and it fits `--model_max_length` with every image
  counted as the tokens it becomes in the model, so no answer is ever cut after image expansion; any
  exception of the tokenizer is a bad sample too, named by id.
The result is each good sample's exact sequence length (for length grouping) and each bad one's
`SkipRecord`. A first assistant turn, which training drops (as LLaVA does), is counted as a note.

`run_data_check` runs it with a progress bar, in parallel for large data (DataLoader workers), and keeps
the result in `<output_dir>/data_check.json`, reused while the data files, the tokenizer, the template, the
settings and this code are unchanged (a resumed run does not check again).
"""

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from moellava import conversation as conversation_lib
from moellava.constants import DEFAULT_IMAGE_TOKEN
from moellava.train.preprocess import PreprocessError, TokenizerTemplateError, preprocess, preprocess_multimodal

logger = logging.getLogger(__name__)

SKIP_HINT = "or pass --skip_bad_samples True to skip and count such samples"
CHECK_FILE = "data_check.json"
CHECK_FORMAT = 1
PARALLEL_FROM = 5000  # samples; fewer are checked in this process

# Reasons a sample is bad; preprocess errors add "preprocess_<kind>" (format, mismatch, truncated, no_labels).
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
MALFORMED_SAMPLE = "malformed_sample"
TOKENIZER_ERROR = "tokenizer_error"
LEADING_ASSISTANT_TURN = "leading_assistant_turn_dropped"


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
            f"{ref.file}: sample {ref.sample_id!r} (entry {ref.index}): {detail.rstrip('.')}. Fix the sample in "
            "the data file, "
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
class Sample:
    """A structurally valid sample; `length` is its sequence length in the model once checked."""

    ref: SampleRef
    images: List[str]
    conversations: list
    length: int = 0


def _speaker_is_assistant(turn) -> bool:
    return str(turn.get("from", "")).lower() in ("gpt", "assistant")


class SampleChecker:
    """Decides whether a sample can be trained on, exactly as training will build it.

    `template`: the conversation template (`--version`); `tokens_per_image`: the LLM positions one image
    becomes (the tower's tokens), 0 for a model without image tower (then any image is an error);
    `image_folder`: where image paths are relative to (None: as written in the data).
    """

    def __init__(self, tokenizer, template, *, image_folder: Optional[str], tokens_per_image: int,
                 mm_use_im_start_end: bool = False):
        self.tokenizer = tokenizer
        self.template = template
        self.image_folder = image_folder
        self.tokens_per_image = tokens_per_image
        self.mm_use_im_start_end = mm_use_im_start_end

    def image_path(self, image: str) -> str:
        return os.path.join(self.image_folder, image) if self.image_folder else image

    def structure(self, path: str, index: int, item) -> Tuple[Sample, List[str]]:
        """The sample, and the notes on it (what training adjusts); BadSampleError when it is malformed."""
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
        for number, turn in enumerate(conversations):
            try:
                turn["value"].encode("utf-8")
            except UnicodeEncodeError as err:
                raise BadSampleError(
                    ref, MALFORMED_SAMPLE,
                    f"turn {number} holds {turn['value'][err.start:err.end]!r} at character {err.start}, a lone "
                    "UTF-16 surrogate (a broken \\uXXXX escape in the JSON), which is no text any tokenizer can "
                    "read: remove it or write the character it was meant to be",
                ) from None

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
        if images and not self.tokens_per_image:
            raise ValueError(
                f"{path}: sample {ref.sample_id!r} has an image but the model has no image tower. Pass "
                "--image_tower (e.g. openai/clip-vit-large-patch14-336) or train on text-only data."
            )
        notes = [LEADING_ASSISTANT_TURN] if _speaker_is_assistant(conversations[0]) else []
        return Sample(ref, images, conversations), notes

    def check_image(self, ref: SampleRef, image: str) -> None:
        path = self.image_path(image)
        try:
            with Image.open(path) as opened:
                if opened.format == "JPEG":
                    opened.draft("RGB", (max(1, opened.width // 8), max(1, opened.height // 8)))
                opened.load()
        except FileNotFoundError:
            raise BadSampleError(ref, MISSING_IMAGE, f"image {path!r} does not exist (check --image_folder)") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise BadSampleError(ref, CORRUPT_IMAGE, f"image {path!r} cannot be decoded ({err})") from None

    def tokenize(self, sample: Sample) -> Dict[str, list]:
        """`input_ids`/`labels` of the sample exactly as training builds them (BadSampleError otherwise)."""
        ref = sample.ref
        conversation_lib.default_conversation = self.template  # DataLoader workers may not share the global
        sources = [[dict(turn) for turn in sample.conversations]]
        try:
            if self.tokens_per_image:
                sources = preprocess_multimodal(sources, mm_use_im_start_end=self.mm_use_im_start_end,
                                                sample_ids=[ref.sample_id])
            return preprocess(sources, self.tokenizer, has_image=bool(sample.images), sample_ids=[ref.sample_id],
                              image_tokens=max(self.tokens_per_image, 1))
        except PreprocessError as err:
            raise BadSampleError(ref, f"preprocess_{err.kind}", err.reason) from None
        except TokenizerTemplateError:
            raise  # the tokenizer does not fit the template: a problem of the run, not of this sample
        except Exception as err:  # noqa: BLE001 - a tokenizer crash on one sample is that sample's problem
            raise BadSampleError(
                ref, TOKENIZER_ERROR, f"the tokenizer failed on this conversation ({type(err).__name__}: {err})"
            ) from None

    def content(self, sample: Sample) -> int:
        """Check the sample's images and text; its sequence length in the model (images expanded)."""
        for image in sample.images:
            self.check_image(sample.ref, image)
        ids = self.tokenize(sample)["input_ids"][0]
        return len(ids) + len(sample.images) * (self.tokens_per_image - 1)


@dataclass
class DataCheckResult:
    """`samples`: the trainable ones, with their lengths; `problems`: one BadSampleError per bad sample;
    `notes`: note -> sample ids (what training adjusts, e.g. a dropped first assistant turn); `total`."""

    samples: List[Sample]
    problems: List[BadSampleError]
    notes: Dict[str, list]
    total: int


class _ContentChecks(Dataset):
    """The content check of each sample as a Dataset, so DataLoader workers run it in parallel."""

    def __init__(self, checker: SampleChecker, samples: List[Sample]):
        self.checker = checker
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            return i, self.checker.content(self.samples[i]), None
        except BadSampleError as err:
            return i, None, err.record


def _unbatched(item):
    return item


def _check_content(checker: SampleChecker, samples: List[Sample], workers: Optional[int], progress: bool):
    from tqdm.auto import tqdm

    checks = _ContentChecks(checker, samples)
    if workers is None:
        workers = min(16, os.cpu_count() or 1)
    if workers > 1 and len(samples) >= PARALLEL_FROM:
        results = DataLoader(checks, batch_size=None, num_workers=workers, collate_fn=_unbatched)
    else:
        results = (checks[i] for i in range(len(checks)))
    return list(tqdm(results, total=len(samples), desc="Data check", unit="sample", disable=not progress,
                     mininterval=2.0))


def check_key(data_paths: Sequence[str], checker: SampleChecker) -> str:
    """What the result depends on: the data files, the tokenizer, the template, the settings, this code."""
    tokenizer = checker.tokenizer
    vocabulary = hashlib.sha256(repr(sorted(tokenizer.get_vocab().items(), key=repr)).encode()).hexdigest()
    files = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in data_paths]
    code = []
    for module in ("preprocess.py", "data_check.py", os.path.join("..", "conversation.py"),
                   os.path.join("..", "mm_utils.py")):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), module), "rb") as f:
            code.append(hashlib.sha256(f.read()).hexdigest())
    template = checker.template
    described = {
        "format": CHECK_FORMAT, "files": files, "image_folder": checker.image_folder,
        "tokenizer": [type(tokenizer).__name__, len(tokenizer), tokenizer.model_max_length,
                      sorted(tokenizer.special_tokens_map.items(), key=str), vocabulary],
        "template": [template.version, template.system, list(template.roles), template.sep, template.sep2,
                     template.sep_style.name],
        "tokens_per_image": checker.tokens_per_image, "mm_use_im_start_end": checker.mm_use_im_start_end,
        "code": code,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _load_saved(path: Optional[str], key: str) -> Optional[dict]:
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if saved.get("key") == key else None


def run_data_check(data_paths: Sequence[str], checker: SampleChecker, *, workers: Optional[int] = None,
                   progress: bool = True, save_path: Optional[str] = None,
                   limit: Optional[int] = None) -> DataCheckResult:
    """Check every sample of `data_paths` (see the module docstring); reuse or write `save_path`.
    `workers`: processes for large data (None: one per CPU core, at most 16; 0 or 1: this process);
    `limit`: check only the first `limit` samples (the doctor's --limit)."""
    entries: List[Tuple[str, int, object]] = [(path, index, item) for path in data_paths
                                              for index, item in enumerate(load_data_file(path))][:limit]
    samples, problems, notes = [], [], {}
    for path, index, item in entries:
        try:
            sample, sample_notes = checker.structure(path, index, item)
        except BadSampleError as err:
            problems.append(err)
            continue
        samples.append(sample)
        for note in sample_notes:
            notes.setdefault(note, []).append(sample.ref.sample_id)

    key = check_key(data_paths, checker) if save_path else None
    saved = _load_saved(save_path, key) if save_path else None
    if saved is not None and len(saved["lengths"]) == len(samples):
        logger.info("Data check: reusing %s (same data, tokenizer, template and settings).", save_path)
        results = [(i, length, SkipRecord(**record) if record else None)
                   for i, (length, record) in enumerate(zip(saved["lengths"], saved["records"]))]
    else:
        results = _check_content(checker, samples, workers, progress)
    good = []
    for (i, length, record), sample in zip(results, samples):
        if record is None:
            sample.length = length
            good.append(sample)
        else:
            problems.append(BadSampleError(sample.ref, record.reason, record.detail))
    problems.sort(key=lambda err: (data_paths.index(err.ref.file), err.ref.index))
    if save_path and saved is None:
        _save(save_path, key, results, problems, notes, len(entries))
    return DataCheckResult(good, problems, notes, len(entries))


def _save(path: str, key: str, results, problems: List[BadSampleError], notes: Dict[str, list],
          total: int) -> None:
    report = {
        "key": key,
        "total_samples": total,
        "bad_samples": len(problems),
        "by_reason": _counts(problems),
        "notes": {note: {"count": len(ids), "sample_ids": ids[:100]} for note, ids in notes.items()},
        "bad": [asdict(err.record) for err in problems],
        # Per structurally valid sample, in data order: its length, or the record that makes it bad.
        "lengths": [length for _, length, _ in results],
        "records": [asdict(record) if record else None for _, _, record in results],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(report, f, default=str)
    os.replace(temporary, path)


def _counts(problems: List[BadSampleError]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for err in problems:
        counts[err.record.reason] = counts.get(err.record.reason, 0) + 1
    return dict(sorted(counts.items()))


def summary(result: DataCheckResult) -> str:
    """One line: how many samples, how many bad by reason, the notes."""
    line = f"{result.total} samples, {len(result.samples)} trainable"
    if result.problems:
        line += f", {len(result.problems)} bad {_counts(result.problems)}"
    for note, ids in sorted(result.notes.items()):
        line += f"; {len(ids)} with {note.replace('_', ' ')} (e.g. {ids[0]!r})"
    return line
