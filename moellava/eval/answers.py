"""Questions in, answers files out, for every answer-generation module: the original's split of the
questions over GPUs (`--num-chunks/--chunk-idx`), its answers-line format, and resuming a run.

An answers file holds one line per question, in question order:
`{question_id, [round_id,] prompt, text, [options, option_char,] answer_id, model_id, metadata}`.
`answer_id` is derived from the model, the question and the answer (the original drew a random one), so
an interrupted and resumed run writes the same file as one uninterrupted run.
"""

import base64
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from moellava.eval.records import EvalInputError

logger = logging.getLogger("moellava.eval")

_SHORTUUID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def split_list(items: Sequence, n: int) -> List[Sequence]:
    """The original's chunks: consecutive slices of ceil(len / n) items (so there can be fewer than n)."""
    size = math.ceil(len(items) / n)
    return [items[i:i + size] for i in range(0, len(items), size)]


def get_chunk(items: Sequence, n: int, k: int) -> Sequence:
    """Chunk `k` of `n`; empty when the ceil split leaves fewer than n chunks (the original failed there)."""
    if n < 1 or not 0 <= k < n:
        raise EvalInputError(f"--chunk-idx {k} is not in 0..{n - 1} (--num-chunks {n}).")
    chunks = split_list(items, n) if items else []
    return chunks[k] if k < len(chunks) else items[:0]


@dataclass(frozen=True)
class ImageRef:
    """Where a question's image comes from: a file, or base64 data (MMBench's TSV)."""

    path: Optional[str] = None
    base64: Optional[str] = None

    def open(self) -> Image.Image:
        if self.path is not None:
            return Image.open(self.path).convert("RGB")
        return Image.open(BytesIO(base64.b64decode(self.base64))).convert("RGB")

    def missing(self) -> bool:
        return self.path is not None and not os.path.isfile(self.path)


@dataclass(frozen=True)
class Question:
    """One question to answer. `text` is the user message without the image placeholder; `prompt` is what
    the answers file records as the prompt (the original's `cur_prompt`); `extra` are the fields written
    after `text` (MMBench's options)."""

    question_id: Any
    text: str
    prompt: str
    image: Optional[ImageRef] = None
    round_id: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> Tuple:
        return (self.question_id, self.round_id, self.prompt)

    def describe(self) -> str:
        rounds = "" if self.round_id is None else f" round {self.round_id}"
        return f"question_id {self.question_id!r}{rounds}"


def answer_id(model_id: str, question: Question, text: str) -> str:
    """A shortuuid-style id (22 characters of its alphabet), fixed by the model, question and answer."""
    number = uuid.uuid5(uuid.NAMESPACE_OID, json.dumps([model_id, list(question.key), text], default=str)).int
    digits = []
    for _ in range(22):
        number, digit = divmod(number, len(_SHORTUUID_ALPHABET))
        digits.append(_SHORTUUID_ALPHABET[digit])
    return "".join(digits)


def answer_line(question: Question, text: str, model_id: str) -> dict:
    line = {"question_id": question.question_id}
    if question.round_id is not None:
        line["round_id"] = question.round_id
    line.update(prompt=question.prompt, text=text, **question.extra)
    line.update(answer_id=answer_id(model_id, question, text), model_id=model_id, metadata={})
    return line


class AnswersFile:
    """The answers file of one run, resumable: the lines already there must be the first questions of this
    run, in order, from the same model; answering continues after them."""

    def __init__(self, path: str, model_id: str):
        self.path = path
        self.model_id = model_id
        self.done: List[dict] = []
        if os.path.exists(path):
            self.done = self._read_existing()

    def _read_existing(self) -> List[dict]:
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        records = []
        offset = 0
        for number, raw in enumerate(lines, start=1):
            last = number == len(lines)
            if last and raw.strip():
                # An interrupted write leaves the last line without its newline: answer that question again.
                logger.warning("%s ends with an incomplete line (an interrupted run): it is dropped and that "
                               "question answered again.", self.path)
                with open(self.path, "r+b") as f:
                    f.truncate(offset)
                break
            offset += len(raw) + 1
            if not raw.strip():
                continue
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError:
                raise EvalInputError(
                    f"{self.path} line {number} is not valid JSON: {raw[:200]!r}. Delete the answers file (or that "
                    "line) to answer again."
                ) from None
        return records

    def remaining(self, questions: Sequence[Question]) -> Sequence[Question]:
        """The questions still to answer; checks the existing lines against the first questions."""
        if len(self.done) > len(questions):
            raise EvalInputError(
                f"{self.path} already holds {len(self.done)} answers but this run has only {len(questions)} "
                "questions: it belongs to another question file or chunk. Pass another --answers-file."
            )
        for number, (line, question) in enumerate(zip(self.done, questions), start=1):
            key = (line.get("question_id"), line.get("round_id"), line.get("prompt"))
            if key != question.key:
                raise EvalInputError(
                    f"{self.path} line {number} answers question_id {key[0]!r} (prompt {str(key[2])[:80]!r}) but "
                    f"question {number} of this run is {question.describe()} (prompt {question.prompt[:80]!r}): the "
                    "file belongs to another question file or chunk. Pass another --answers-file."
                )
            if line.get("model_id") != self.model_id:
                raise EvalInputError(
                    f"{self.path} line {number} was answered by model_id {line.get('model_id')!r}, not "
                    f"{self.model_id!r}. Pass another --answers-file for this checkpoint."
                )
        return questions[len(self.done):]

    def write(self, questions: Sequence[Question], texts: Sequence[str]) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for question, text in zip(questions, texts):
                f.write(json.dumps(answer_line(question, text, self.model_id)) + "\n")
