"""The benchmark files: reading json/jsonl with errors that name the file and line, writing results, and the
score files (`--score-file`) that `report` gathers into one table. No model, no torch."""

import csv
import functools
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from moellava.errors import run_main

logger = logging.getLogger("moellava.eval")


class EvalInputError(ValueError):
    """An input file that cannot be scored as it is; the message names the file, the entry and the fix."""


def read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise EvalInputError(f"{path} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise EvalInputError(f"{path} is not valid JSON: {error}.") from None


def read_jsonl(path: str, required: Sequence[str] = ()) -> List[dict]:
    """Every non-blank line of a JSON-lines file, each an object with the `required` keys."""
    if not os.path.isfile(path):
        raise EvalInputError(f"{path} does not exist.")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvalInputError(f"{path} line {number} is not valid JSON ({error}): {line[:200]!r}.") from None
            if not isinstance(record, dict):
                raise EvalInputError(f"{path} line {number} is not a JSON object: {line[:200]!r}.")
            missing = [key for key in required if key not in record]
            if missing:
                raise EvalInputError(f"{path} line {number} lacks {missing} (it has {sorted(record)}).")
            records.append(record)
    return records


# The strings pandas.read_table reads as NaN by default (the original reads MMBench's TSV with pandas).
TABLE_NA_STRINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})


def is_none(value: Optional[str]) -> bool:
    """A missing table cell as the original's `is_none` sees it after pandas: NaN, or 'nan' / 'none'."""
    return value is None or value in TABLE_NA_STRINGS or value.lower() in ("nan", "none")


def read_table(path: str) -> Tuple[List[str], List[Dict[str, Optional[str]]]]:
    """A tab-separated file with a header row (MMBench's TSV, base64 images included): the columns, and
    one dict per row whose missing cells are None. The `index` column is read as integers, as pandas does."""
    if not os.path.isfile(path):
        raise EvalInputError(f"{path} does not exist.")
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default field limit
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        columns = next(reader, None)
        if not columns:
            raise EvalInputError(f"{path} is empty: expected a header row of tab-separated column names.")
        rows = []
        for number, cells in enumerate(reader, start=2):
            if len(cells) != len(columns):
                raise EvalInputError(f"{path} line {number} has {len(cells)} cells for {len(columns)} columns.")
            row = {c: (None if v in TABLE_NA_STRINGS else v) for c, v in zip(columns, cells)}
            if row.get("index") is not None:
                try:
                    row["index"] = int(row["index"])
                except ValueError:
                    raise EvalInputError(f"{path} line {number}: index {row['index']!r} is not an integer.") from None
            rows.append(row)
    return columns, rows


def read_answer_texts(path: str) -> Tuple[Dict[Any, str], int]:
    """`{question_id: text}` of an answers file and the number of lines that are not JSON answers, which the
    original's submission converters skip and count ("error_line") instead of stopping."""
    if not os.path.isfile(path):
        raise EvalInputError(f"{path} does not exist.")
    texts, errors = {}, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                texts[record["question_id"]] = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                errors += 1
    if errors:
        logger.warning("%s: %d line(s) are not answers and were skipped (as the official converter does).", path,
                       errors)
    return texts, errors


def write_json(path: str, data: Any, indent: Optional[int] = None) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_score(path: Optional[str], benchmark: str, metrics: Dict[str, Any], headline: Optional[float],
                **details: Any) -> None:
    """The score file `report` reads: the benchmark, its headline number (None for a server-scored
    submission), every metric, and details such as the submission file or the warning counts."""
    if path:
        write_json(path, {"benchmark": benchmark, "headline": headline, "metrics": metrics, **details}, indent=2)


def command_line(main: Callable) -> Callable:
    """Run `main(argv)` as a command: warnings on stderr, an input error as one message and exit status 1."""

    @functools.wraps(main)
    def run(argv=None, **options):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
        return run_main(functools.partial(main, **options), argv)

    return run
