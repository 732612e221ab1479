"""Prompt preparation: read, clean, validate, split, embed and publish one prompt data set.

``prepare_prompts(input_uri, output_uri)`` is the library side of the pipeline's
``prepare-prompts`` step:

1. **read** a txt (one prompt per line), csv / tsv, jsonl, json or parquet file from a local
   path, ``file://`` or ``s3://`` URI, and pick the prompt column (``column``, else the first of
   ``prompt`` / ``caption`` / ``text``);
2. **clean**: whitespace runs (tabs, newlines) become one space and the ends are stripped; empty
   prompts, prompts with CJK characters (the reference keeps the first 50k HPDv2 prompts without
   CJK), prompts outside ``[min_chars, max_chars]`` and duplicates (the first is kept) are dropped
   and counted. Other control characters are *not* silently dropped (they mean a corrupted file)
   unless ``drop_control_chars``: the validation suite fails and names the rows;
3. **validate** with a great-expectations suite (non-null, unique, length bounds, no control
   characters, minimum row count); a failure raises :class:`PromptValidationError` whose message
   and saved report (``report.md`` + ``validation.json``) say which expectation failed on which rows;
4. **split** train / test with a seed (each split keeps the input order);
5. **embed** (optional): ``embed_fn(prompts) -> {name: Tensor[len(prompts), ...]}`` saved as
   safetensors shards ``embeddings/{split}-00000.safetensors``...;
6. **publish** everything under ``output_uri`` with :func:`mixgrpo.storage.publish_dir`
   (``MANIFEST.json`` last): ``train.txt``, ``test.txt``, ``report.md``, ``validation.json``,
   ``embeddings/``.

Published files are a pure function of the input and the settings (no timestamps), so
:attr:`PreparedPrompts.dataset_hash` identifies the data set's content.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import random
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from mixgrpo.storage import (
    MANIFEST_NAME,
    Manifest,
    NotFoundError,
    StorageError,
    open_store,
    publish_dir,
    read_manifest,
)

if TYPE_CHECKING:
    import pandas as pd
    import torch

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ("prompt", "caption", "text")  # auto-detected, in this order
SPLITS = ("train", "test")
DATASET_KIND = "mixgrpo-prompts/1"
FAILED_DIR = "validation-failed"  # where a failed suite's report goes under the output prefix
FORMATS = {
    ".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".json": "json", ".parquet": "parquet", ".pq": "parquet",
}
# CJK ideographs (with extensions and compatibility forms), kana, hangul, CJK punctuation and
# full-width forms: a superset of the reference's U+4E00..U+9FFF test.
CJK_RE = re.compile(
    "[\u1100-\u11ff\u2e80-\u2fdf\u3000-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0002fa1f]"
)
# C0 / C1 control characters (tabs and newlines are already spaces after whitespace folding).
CONTROL_PATTERN = r"[\x00-\x1f\x7f-\x9f]"
CONTROL_RE = re.compile(CONTROL_PATTERN)

EmbedFn = Callable[[list[str]], Mapping[str, "torch.Tensor"]]


# --------------------------------------------------------------------------- errors and settings


class DataError(ValueError):
    """The prompt input cannot be used; the message names the input (URI, line / row, column) and the fix."""


class PromptValidationError(DataError):
    """The great-expectations suite failed; :attr:`report` says which expectation on which rows."""

    def __init__(self, message: str, report: ValidationReport, report_uri: str | None) -> None:
        super().__init__(message)
        self.report = report
        self.report_uri = report_uri


@dataclass(frozen=True)
class PrepareSettings:
    """How a prompt file is cleaned, validated, split and embedded (resolved once, checked here)."""

    column: str | None = None  # prompt column of csv / jsonl / json / parquet; None: auto (PROMPT_COLUMNS)
    input_format: str | None = None  # txt | csv | tsv | jsonl | json | parquet; None: from the file suffix
    min_chars: int = 3  # shorter prompts (after whitespace folding) are dropped
    max_chars: int = 500  # longer prompts are dropped
    min_rows: int = 16  # fewer prompts after cleaning fail the suite
    test_fraction: float | None = None  # share of prompts held out; default 0.1 when test_count is None too
    test_count: int | None = None  # exact number held out (the reference: 400); excludes test_fraction
    seed: int = 0  # seeds the train / test split
    drop_cjk: bool = True  # drop prompts containing CJK characters, as the reference does
    drop_control_chars: bool = False  # drop prompts with control characters instead of failing the suite
    shard_size: int = 1024  # prompts per embedding shard
    max_examples: int = 20  # rows listed per finding in reports and errors

    def __post_init__(self) -> None:
        if self.input_format is not None and self.input_format not in set(FORMATS.values()):
            raise DataError(f"input_format={self.input_format!r}: use one of {sorted(set(FORMATS.values()))}")
        if not 1 <= self.min_chars <= self.max_chars:
            raise DataError(f"length bounds min_chars={self.min_chars}, max_chars={self.max_chars}: "
                            "need 1 <= min <= max")
        if self.min_rows < 2:
            raise DataError(f"min_rows={self.min_rows}: need at least 2 (one train and one test prompt)")
        if self.test_fraction is not None and self.test_count is not None:
            raise DataError("give test_fraction or test_count, not both")
        if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
            raise DataError(f"test_fraction={self.test_fraction}: need 0 < test_fraction < 1")
        if self.test_count is not None and self.test_count < 1:
            raise DataError(f"test_count={self.test_count}: need at least 1")
        if self.shard_size < 1 or self.max_examples < 1:
            raise DataError(f"shard_size={self.shard_size}, max_examples={self.max_examples}: need >= 1")

    def test_size(self, n: int) -> int:
        """How many of ``n`` prompts go to the test split (at least 1, leaving at least 1 to train)."""
        if self.test_count is not None:
            size = self.test_count
        else:
            size = max(1, round(n * (0.1 if self.test_fraction is None else self.test_fraction)))
        if size >= n:
            raise DataError(f"test split of {size} prompts leaves none to train on ({n} prompts after cleaning): "
                            "lower test_count / test_fraction or add prompts")
        return size


@dataclass(frozen=True)
class PreparedPrompts:
    """What :func:`prepare_prompts` published."""

    uri: str  # the output prefix (has MANIFEST.json)
    source: str  # the input URI
    column: str  # the prompt column read ("prompt" for txt)
    n_input: int  # rows read
    n_train: int
    n_test: int
    dropped: Mapping[str, int]  # cleaning reason -> rows dropped
    dataset_hash: str  # sha256 over the published files' (path, sha256): the data set's identity
    embedding_shards: int  # safetensors shards written (0 without embed_fn)
    manifest: Manifest = field(repr=False)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RawPrompts:
    """The prompt column as read: values and where each came from."""

    source: str
    column: str
    unit: str  # "line" (txt, jsonl) or "row" (csv, json, parquet; 1-based, header not counted)
    locations: list[int]
    values: list[Any]


def read_prompts(uri: str, settings: PrepareSettings = PrepareSettings()) -> RawPrompts:
    """Read the prompt column of a local / ``file://`` / ``s3://`` file (no cleaning)."""
    fmt = settings.input_format or _format_from_suffix(uri)
    data = _read_bytes(uri)
    if not data.strip():
        raise DataError(f"prompt input {uri} is empty: give a file with at least {settings.min_rows} prompts")
    if fmt == "parquet":
        return _read_parquet(uri, data, settings.column)
    text = _decode(uri, data)
    if fmt == "txt":
        if settings.column not in (None, "", "prompt"):
            raise DataError(f"column={settings.column!r} given, but {uri} is plain text with one prompt per line: "
                            "drop the column setting or use csv / jsonl / parquet")
        lines = text.split("\n")
        return RawPrompts(uri, "prompt", "line", list(range(1, len(lines) + 1)), lines)
    if fmt in ("csv", "tsv"):
        return _read_csv(uri, text, settings.column, "\t" if fmt == "tsv" else ",")
    if fmt == "jsonl":
        return _read_jsonl(uri, text, settings.column)
    return _read_json(uri, text, settings.column)


def _format_from_suffix(uri: str) -> str:
    suffix = PurePosixPath(urlparse(uri).path).suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"cannot tell the format of {uri} from its suffix {suffix or '(none)'!r}: use one of "
                        f"{', '.join(sorted(FORMATS))} or set input_format")
    return FORMATS[suffix]


def _read_bytes(uri: str) -> bytes:
    """The bytes of one file at a local path, ``file://`` or ``s3://`` URI."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        parent, _, name = parsed.path.strip("/").rpartition("/")
        if not name:
            raise DataError(f"prompt input {uri} names no object: use s3://BUCKET/path/prompts.txt")
        try:
            return open_store(f"s3://{parsed.netloc}/{parent}").get_bytes(name)
        except NotFoundError as exc:
            raise DataError(f"prompt input {uri} does not exist: check the URI ({exc})") from exc
        except StorageError as exc:
            raise DataError(f"cannot read prompt input {uri}: {exc}") from exc
    path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
    if parsed.scheme not in ("", "file"):
        raise DataError(f"unsupported prompt input URI {uri!r}: use a local path, file:///PATH or s3://BUCKET/KEY")
    if path.is_dir():
        raise DataError(f"prompt input {uri} is a directory: give one file (txt, csv, jsonl, json or parquet)")
    if not path.is_file():
        raise DataError(f"prompt input {uri} does not exist: check the path")
    return path.read_bytes()


def _decode(uri: str, data: bytes) -> str:
    """UTF-8 text (a BOM is dropped; CRLF becomes LF), or an error for binary / other encodings."""
    nul = data.find(b"\x00", 0, 1 << 16)
    if nul >= 0 or data[:4] == b"PAR1":
        raise DataError(f"prompt input {uri} looks binary (NUL byte at offset {max(nul, 0)}): give a UTF-8 text "
                        "file, or a .parquet file (or set input_format='parquet')")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"prompt input {uri} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                        "re-save it as UTF-8") from None
    return text.replace("\r\n", "\n")


def _pick_column(uri: str, columns: Sequence[str], column: str | None) -> str:
    """The prompt column: the given one (which must exist) or the first of PROMPT_COLUMNS present."""
    available = ", ".join(repr(c) for c in columns) or "(none)"
    if column:
        if column not in columns:
            raise DataError(f"column {column!r} is not in {uri}; available columns: {available}")
        return column
    found = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if found is None:
        raise DataError(f"{uri} has none of the prompt columns {list(PROMPT_COLUMNS)}; available columns: "
                        f"{available}: set column to the one holding the prompts")
    return found


def _read_csv(uri: str, text: str, column: str | None, sep: str) -> RawPrompts:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    try:
        header = next(reader)
        rows = list(reader)
    except csv.Error as exc:
        raise DataError(f"{uri}: malformed CSV near line {reader.line_num}: {exc}") from None
    name = _pick_column(uri, [h.strip() for h in header], column)
    index = [h.strip() for h in header].index(name)
    values = [row[index] if index < len(row) else None for row in rows]
    return RawPrompts(uri, name, "row", list(range(1, len(values) + 1)), values)


def _read_jsonl(uri: str, text: str, column: str | None) -> RawPrompts:
    records, locations = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{uri} line {number}: not valid JSON ({exc.msg} at column {exc.colno}): "
                            "write one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{uri} line {number}: a JSON {type(record).__name__}, expected an object like "
                            '{"prompt": "..."}')
        records.append(record)
        locations.append(number)
    return _from_records(uri, records, locations, column, "line")


def _read_json(uri: str, text: str, column: str | None) -> RawPrompts:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{uri} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(doc, list):
        raise DataError(f"{uri}: the JSON document is a {type(doc).__name__}; expected a list of strings or objects")
    if all(isinstance(item, str) for item in doc):
        if column not in (None, "", "prompt"):
            raise DataError(f"column={column!r} given, but {uri} is a list of strings: drop the column setting")
        return RawPrompts(uri, "prompt", "row", list(range(1, len(doc) + 1)), doc)
    bad = next((i for i, item in enumerate(doc, start=1) if not isinstance(item, dict)), None)
    if bad is not None:
        raise DataError(f"{uri} row {bad}: a JSON {type(doc[bad - 1]).__name__} in a list of objects; "
                        "use only objects (or only strings)")
    return _from_records(uri, doc, list(range(1, len(doc) + 1)), column, "row")


def _from_records(uri: str, records: list[dict[str, Any]], locations: list[int], column: str | None,
                  unit: str) -> RawPrompts:
    columns = list(dict.fromkeys(key for record in records for key in record))
    name = _pick_column(uri, columns, column)
    values = [record.get(name) for record in records]
    for location, value in zip(locations, values):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{uri} {unit} {location}: column {name!r} holds a {type(value).__name__} ({value!r}); "
                            "prompts must be strings")
    return RawPrompts(uri, name, unit, locations, values)


def _read_parquet(uri: str, data: bytes, column: str | None) -> RawPrompts:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if data[:4] != b"PAR1" or data[-4:] != b"PAR1":
        raise DataError(f"prompt input {uri} is not a Parquet file (no PAR1 magic): check the file or its suffix")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read Parquet file {uri}: {exc}") from exc
    name = _pick_column(uri, table.column_names, column)
    kind = table.schema.field(name).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"column {name!r} of {uri} has type {kind}; prompts must be a string column")
    values = table.column(name).to_pylist()
    return RawPrompts(uri, name, "row", list(range(1, len(values) + 1)), values)


# --------------------------------------------------------------------------- the trainer's prompt files


PREVIEW_CHARS = 80  # characters of a prompt quoted in an error message


def clip_text(value: Any, limit: int = PREVIEW_CHARS) -> Any:
    """A string cut to ``limit`` characters, with its full length when cut (reports and errors); else ``value``."""
    if not isinstance(value, str) or len(value) <= limit:
        return value
    return f"{value[:limit]}... ({len(value)} characters)"


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``repr`` of at most ``limit`` characters of ``text`` (with the full length when cut)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def read_training_prompts(uri: str, settings: PrepareSettings = PrepareSettings()) -> list[str]:
    """The prompts of a training / evaluation file (``prompts=`` / ``eval_prompts=``), validated up front.

    Read exactly as :func:`prepare_prompts` reads (:func:`read_prompts`: txt / csv / tsv / jsonl / json /
    parquet by suffix, UTF-8, the prompt column), whitespace folded by :func:`normalize_prompt`. Blank
    lines are skipped, duplicates are dropped (the first kept) and reported; a prompt with control
    characters or longer than ``settings.max_chars`` is a :class:`DataError` naming ``file:line`` (quoting
    at most :data:`PREVIEW_CHARS` characters), so a bad file fails before training starts.
    """
    raw = read_prompts(uri, settings)
    prompts: list[str] = []
    first_seen: dict[str, int] = {}
    duplicates: list[tuple[int, int]] = []
    for location, value in zip(raw.locations, raw.values):
        text = normalize_prompt(value)
        where = f"{uri}:{location}" if raw.unit == "line" else f"{uri} {raw.unit} {location}"
        if not text:
            continue
        if (bad := CONTROL_RE.search(text)) is not None:
            raise DataError(f"{where}: prompt has a control character {bad.group()!r} at column {bad.start() + 1}: "
                            f"{preview(text)}; the file is corrupt or binary: fix or remove the line")
        if len(text) > settings.max_chars:
            raise DataError(f"{where}: prompt of {len(text)} characters is longer than {settings.max_chars}: "
                            f"{preview(text)}; shorten it or remove the line")
        if text in first_seen:
            duplicates.append((location, first_seen[text]))
            continue
        first_seen[text] = location
        prompts.append(text)
    if not prompts:
        raise DataError(f"prompt file {uri} has no prompts in column {raw.column!r}")
    if duplicates:
        shown = ", ".join(f"{raw.unit} {a} = {raw.unit} {b}" for a, b in duplicates[:5])
        message = f"prompt file {uri}: dropped {len(duplicates)} duplicate prompt(s) ({shown}{', ...' if len(duplicates) > 5 else ''})"
        log.warning(message)
        print(f"mixgrpo: warning: {message}")
    return prompts


# --------------------------------------------------------------------------- cleaning


DROP_REASONS = {
    "empty": "empty or missing",
    "cjk": "contains CJK characters",
    "too_short": "shorter than min_chars",
    "too_long": "longer than max_chars",
    "control_chars": "contains control characters",
    "duplicate": "duplicate of an earlier prompt",
}


@dataclass(frozen=True)
class Cleaned:
    """Prompts kept by :func:`clean_prompts`, and what was dropped (counts and first examples)."""

    locations: list[int]
    prompts: list[str]
    dropped: dict[str, int]
    examples: dict[str, list[dict[str, Any]]]  # reason -> [{"location": .., "value": ..}]


def normalize_prompt(value: Any) -> str:
    """Whitespace runs (spaces, tabs, newlines) folded to one space, ends stripped; None -> ''."""
    return " ".join(value.split()) if isinstance(value, str) else ""


def clean_prompts(raw: RawPrompts, settings: PrepareSettings) -> Cleaned:
    """Fold whitespace and drop empty, CJK, out-of-bounds and duplicate prompts (first kept)."""
    dropped = dict.fromkeys(DROP_REASONS, 0)
    examples: dict[str, list[dict[str, Any]]] = {reason: [] for reason in DROP_REASONS}
    first_seen: dict[str, int] = {}
    locations, prompts = [], []
    for location, value in zip(raw.locations, raw.values):
        text = normalize_prompt(value)
        reason = _drop_reason(text, first_seen, settings)
        if reason is None:
            first_seen[text] = location
            locations.append(location)
            prompts.append(text)
            continue
        dropped[reason] += 1
        if len(examples[reason]) < settings.max_examples and not (reason == "empty" and raw.unit == "line"):
            example = {"location": location, "value": clip_text(text)}
            if reason == "duplicate":
                example["first"] = first_seen[text]
            examples[reason].append(example)
    return Cleaned(locations, prompts, dropped, examples)


def _drop_reason(text: str, seen: Mapping[str, int], settings: PrepareSettings) -> str | None:
    if not text:
        return "empty"
    if settings.drop_cjk and CJK_RE.search(text):
        return "cjk"
    if len(text) < settings.min_chars:
        return "too_short"
    if len(text) > settings.max_chars:
        return "too_long"
    if settings.drop_control_chars and CONTROL_RE.search(text):
        return "control_chars"
    if text in seen:
        return "duplicate"
    return None


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation of the suite: what it checks and, when it failed, on which rows."""

    expectation: str  # the great-expectations type, e.g. expect_column_values_to_be_unique
    checks: str  # in words
    success: bool
    observed: Any  # unexpected count, or the observed value (row count)
    examples: list[dict[str, Any]]  # first failing rows: {"location": .., "value": ..}


@dataclass(frozen=True)
class ValidationReport:
    """Cleaning counts and the suite's outcome for one input; rendered as Markdown and JSON."""

    source: str
    column: str
    unit: str
    settings: Mapping[str, Any]
    n_input: int
    n_clean: int
    dropped: Mapping[str, int]
    dropped_examples: Mapping[str, list[dict[str, Any]]]
    expectations: list[ExpectationOutcome]
    splits: Mapping[str, int] = field(default_factory=dict)  # filled after a successful split

    @property
    def success(self) -> bool:
        return all(e.success for e in self.expectations)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [e for e in self.expectations if not e.success]

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["success"] = self.success
        return doc

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n"

    def summary(self) -> str:
        """One line per failed expectation with its first rows (for error messages)."""
        lines = []
        for outcome in self.failures:
            rows = ", ".join(f"{self.unit} {ex['location']}: {ex['value']!r}" for ex in outcome.examples[:5])
            lines.append(f"  - {outcome.expectation} ({outcome.checks}): {_observed_text(outcome, self.unit)}"
                         + (f"; e.g. {rows}" if rows else ""))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        status = "PASSED" if self.success else "FAILED"
        out = [
            f"# Prompt data validation: {status}", "",
            f"- input: `{self.source}` (column `{self.column}`)",
            f"- rows read: {self.n_input}; kept after cleaning: {self.n_clean}",
        ]
        if self.splits:
            out.append("- splits: " + ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        out += ["", "## Cleaning", "", "| dropped because | rows |", "|---|---:|"]
        out += [f"| {DROP_REASONS[r]} | {n} |" for r, n in self.dropped.items()]
        for reason, examples in self.dropped_examples.items():
            if examples:
                out += ["", f"First rows dropped as {DROP_REASONS[reason]}:", ""]
                out += [f"- {self.unit} {ex['location']}: `{_md(ex['value'])}`"
                        + (f" (first at {self.unit} {ex['first']})" if "first" in ex else "") for ex in examples]
        out += ["", "## Expectations", "", "| expectation | checks | result | observed |", "|---|---|---|---|"]
        out += [f"| `{e.expectation}` | {e.checks} | {'pass' if e.success else '**FAIL**'} | "
                f"{_observed_text(e, self.unit)} |" for e in self.expectations]
        for outcome in self.failures:
            if outcome.examples:
                out += ["", f"### `{outcome.expectation}` failed on", ""]
                out += [f"- {self.unit} {ex['location']}: `{_md(ex['value'])}`" for ex in outcome.examples]
        return "\n".join(out) + "\n"


def _observed_text(outcome: ExpectationOutcome, unit: str) -> str:
    if outcome.expectation == "expect_table_row_count_to_be_between":
        return f"{outcome.observed} rows"
    n = outcome.observed
    return f"{n} {unit}{'' if n == 1 else 's'} unexpected"


def _md(value: Any) -> str:
    """A value shown in Markdown: control characters escaped, backticks replaced."""
    return repr(value)[1:-1].replace("`", "'") if isinstance(value, str) else str(value)


def validate_prompts(prompts: Sequence[str | None], locations: Sequence[int], settings: PrepareSettings,
                     ) -> list[ExpectationOutcome]:
    """Run the great-expectations suite over the prompts; one outcome per expectation."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    import pandas as pd

    frame = pd.DataFrame({"location": list(locations), "prompt": list(prompts)})
    column = "prompt"
    suite_spec = [
        (gxe.ExpectColumnValuesToNotBeNull(column=column), "no missing prompt"),
        (gxe.ExpectColumnValuesToBeUnique(column=column), "no duplicate prompt"),
        (gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=settings.min_chars,
                                                 max_value=settings.max_chars),
         f"length in [{settings.min_chars}, {settings.max_chars}] characters"),
        (gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=CONTROL_PATTERN), "no control characters"),
        (gxe.ExpectTableRowCountToBeBetween(min_value=settings.min_rows), f"at least {settings.min_rows} prompts"),
    ]
    result = _run_suite(gx, frame, [spec for spec, _ in suite_spec], settings.max_examples)
    outcomes = []
    for (spec, checks), item in zip(suite_spec, result.results):
        if item.exception_info.get("raised_exception"):
            raise DataError(f"great-expectations could not evaluate {spec.expectation_type}: "
                            f"{item.exception_info.get('exception_message')}")
        outcomes.append(_outcome(spec.expectation_type, checks, item.success, dict(item.result), settings))
    return outcomes


def _run_suite(gx: Any, frame: pd.DataFrame, expectations: list[Any], max_examples: int) -> Any:
    """Validate ``frame`` against ``expectations`` in an ephemeral context (no files, no progress bars)."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("prompts").add_dataframe_asset("prompts")
             .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(gx.ExpectationSuite(name="prompts", expectations=expectations))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="prompts", data=batch, suite=suite))
    result_format = {"result_format": "SUMMARY", "unexpected_index_column_names": ["location"],
                     "partial_unexpected_count": max_examples}
    return definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)


def _outcome(kind: str, checks: str, success: bool, result: dict[str, Any], settings: PrepareSettings,
             ) -> ExpectationOutcome:
    if "observed_value" in result:
        return ExpectationOutcome(kind, checks, bool(success), int(result["observed_value"]), [])
    examples = [{"location": int(item["location"]), "value": clip_text(_plain(item.get("prompt")))}
                for item in (result.get("partial_unexpected_index_list") or [])[: settings.max_examples]]
    return ExpectationOutcome(kind, checks, bool(success), int(result.get("unexpected_count") or 0), examples)


def _plain(value: Any) -> Any:
    """NaN / None from pandas as None, anything else unchanged (JSON-friendly)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


# --------------------------------------------------------------------------- split, embed, publish


def split_prompts(prompts: Sequence[str], settings: PrepareSettings) -> dict[str, list[str]]:
    """Seeded train / test split; each split keeps the input order."""
    n_test = settings.test_size(len(prompts))
    order = list(range(len(prompts)))
    random.Random(settings.seed).shuffle(order)
    held_out = set(order[:n_test])
    return {
        "train": [p for i, p in enumerate(prompts) if i not in held_out],
        "test": [p for i, p in enumerate(prompts) if i in held_out],
    }


def write_embeddings(prompts: Sequence[str], split: str, embed_fn: EmbedFn, out_dir: Path, shard_size: int) -> int:
    """Embed ``prompts`` shard by shard into ``out_dir/{split}-NNNNN.safetensors``; returns the shard count."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = 0
    for shards, start in enumerate(range(0, len(prompts), shard_size), start=1):
        chunk = list(prompts[start : start + shard_size])
        tensors = _check_embeddings(embed_fn(chunk), len(chunk), split, start)
        metadata = {"split": split, "start": str(start), "count": str(len(chunk))}
        save_file(tensors, str(out_dir / f"{split}-{shards - 1:05d}.safetensors"), metadata=metadata)
    return shards


def _check_embeddings(tensors: Any, count: int, split: str, start: int) -> dict[str, torch.Tensor]:
    import torch

    where = f"embed_fn on {split} prompts {start}..{start + count - 1}"
    if not isinstance(tensors, Mapping) or not tensors:
        raise DataError(f"{where} returned {type(tensors).__name__}; expected a non-empty dict name -> Tensor")
    out = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.ndim == 0 or tensor.shape[0] != count:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise DataError(f"{where}: {name!r} is {shape}; expected a Tensor with first dimension {count}")
        out[str(name)] = tensor.detach().to("cpu").contiguous()
    return out


def dataset_hash(manifest: Manifest) -> str:
    """sha256 over the sorted (path, sha256) of a manifest's files: stable across re-publications."""
    lines = sorted(f"{f.path}\t{f.sha256}\n" for f in manifest.files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def prepare_prompts(
    input_uri: str,
    output_uri: str,
    *,
    embed_fn: EmbedFn | None = None,
    report_dir: str | Path | None = None,
    settings: PrepareSettings | None = None,
    **options: Any,
) -> PreparedPrompts:
    """Read, clean, validate, split, (embed) and publish prompts from ``input_uri`` to ``output_uri``.

    ``options`` are :class:`PrepareSettings` fields (``column``, ``min_chars``, ``max_chars``,
    ``min_rows``, ``test_fraction`` / ``test_count``, ``seed``, ``drop_cjk``, ``shard_size``...),
    or pass ``settings``. ``report_dir``: a local directory that also gets ``report.md`` and
    ``validation.json`` (for a KFP Markdown artifact), pass or fail.

    Raises :class:`DataError` for unreadable input and :class:`PromptValidationError` when the
    suite fails; the failure report is then written to ``{output_uri}/validation-failed/`` and
    nothing is published (a data set published there earlier stays as it was, manifest included).
    """
    if settings is not None and options:
        raise DataError(f"pass settings or keyword options, not both (got {sorted(options)})")
    settings = settings or PrepareSettings(**options)
    raw = read_prompts(input_uri, settings)
    cleaned = clean_prompts(raw, settings)
    if not cleaned.prompts:
        counts = ", ".join(f"{n} {DROP_REASONS[r]}" for r, n in cleaned.dropped.items() if n)
        raise DataError(f"prompt input {input_uri} has no usable prompt in column {raw.column!r} after cleaning "
                        f"({len(raw.values)} {raw.unit}s: {counts}): check the file and column")
    outcomes = validate_prompts(cleaned.prompts, cleaned.locations, settings)
    report = ValidationReport(
        source=input_uri, column=raw.column, unit=raw.unit, settings=asdict(settings), n_input=len(raw.values),
        n_clean=len(cleaned.prompts), dropped=cleaned.dropped, dropped_examples=cleaned.examples,
        expectations=outcomes,
    )
    if not report.success:
        _fail(report, output_uri, report_dir, cleaned)
    splits = split_prompts(cleaned.prompts, settings)
    report = replace(report, splits={k: len(v) for k, v in splits.items()})
    with tempfile.TemporaryDirectory(prefix="mixgrpo-prompts-") as tmp:
        root = Path(tmp)
        for name, prompts in splits.items():
            (root / f"{name}.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
        _write_report(report, root)
        if report_dir is not None:
            _write_report(report, Path(report_dir))
        shards = 0
        if embed_fn is not None:
            shards = sum(write_embeddings(splits[s], s, embed_fn, root / "embeddings", settings.shard_size)
                         for s in SPLITS)
        metadata = {"kind": DATASET_KIND, "source": input_uri, "column": raw.column,
                    "counts": {"input": len(raw.values), **report.splits}, "dropped": cleaned.dropped,
                    "settings": asdict(settings), "embedding_shards": shards}
        manifest = publish_dir(root, output_uri, metadata=metadata)
    prepared = PreparedPrompts(
        uri=output_uri, source=input_uri, column=raw.column, n_input=len(raw.values), n_train=len(splits["train"]),
        n_test=len(splits["test"]), dropped=cleaned.dropped, dataset_hash=dataset_hash(manifest),
        embedding_shards=shards, manifest=manifest,
    )
    log.info("prepared %d train / %d test prompts from %s at %s (dataset %s)", prepared.n_train,
             prepared.n_test, input_uri, output_uri, prepared.dataset_hash[:12])
    return prepared


def _write_report(report: ValidationReport, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.md").write_text(report.to_markdown(), encoding="utf-8")
    (directory / "validation.json").write_bytes(report.to_json())


def _fail(report: ValidationReport, output_uri: str, report_dir: str | Path | None, cleaned: Cleaned) -> None:
    """Save the failure report (output prefix and ``report_dir``) and raise PromptValidationError."""
    if report_dir is not None:
        _write_report(report, Path(report_dir))
    report_uri = None
    try:
        store = open_store(output_uri)
        store.put_bytes(f"{FAILED_DIR}/report.md", report.to_markdown().encode())
        store.put_bytes(f"{FAILED_DIR}/validation.json", report.to_json())
        report_uri = store.uri_for(f"{FAILED_DIR}/report.md")
    except StorageError as exc:  # the error below must still say what is wrong with the data
        log.warning("could not save the validation report under %s: %s", output_uri, exc)
    dropped = ", ".join(f"{n} {DROP_REASONS[r]}" for r, n in cleaned.dropped.items() if n) or "nothing"
    raise PromptValidationError(
        f"prompt validation failed for {report.source} (column {report.column!r}; {report.n_input} "
        f"{report.unit}s read, {report.n_clean} kept after cleaning; dropped: {dropped}); "
        f"{len(report.failures)} of {len(report.expectations)} expectations failed:\n{report.summary()}\n"
        f"report: {report_uri or report_dir or '(not saved)'}; fix the input rows named above "
        "(or set drop_control_chars / lower min_rows)",
        report, report_uri,
    )


# --------------------------------------------------------------------------- reading back


def load_prepared_prompts(uri: str, split: str) -> list[str]:
    """The prompts of ``split`` ("train" or "test") of a data set published by :func:`prepare_prompts`."""
    return _read_published(uri, f"{_check_split(split)}.txt").decode("utf-8").splitlines()


def load_prepared_embeddings(uri: str, split: str) -> dict[str, torch.Tensor]:
    """The embeddings of ``split``, shards concatenated in prompt order."""
    import torch
    from safetensors.torch import load

    _check_split(split)
    manifest = read_manifest(uri)
    names = sorted(f.path for f in manifest.files if f.path.startswith(f"embeddings/{split}-"))
    if not names:
        raise DataError(f"{uri} has no embeddings for split {split!r}: prepare it with an embed_fn")
    shards = [load(_read_published(uri, name, manifest)) for name in names]
    return {key: torch.cat([shard[key] for shard in shards]) for key in shards[0]}


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {list(SPLITS)}")
    return split


def _read_published(uri: str, path: str, manifest: Manifest | None = None) -> bytes:
    """One file of a published data set, checked against its manifest's sha256."""
    manifest = manifest or read_manifest(uri)
    entry = next((f for f in manifest.files if f.path == path), None)
    if entry is None:
        raise DataError(f"{uri} has no {path} in its {MANIFEST_NAME}: is it a prepared prompt data set?")
    data = open_store(uri).get_bytes(path)
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise DataError(f"{uri}/{path} does not match its {MANIFEST_NAME} sha256: re-run prepare-prompts")
    return data


__all__ = [
    "DataError", "PromptValidationError", "PrepareSettings", "PreparedPrompts", "RawPrompts", "Cleaned",
    "ExpectationOutcome", "ValidationReport", "read_prompts", "clean_prompts", "normalize_prompt",
    "validate_prompts", "split_prompts", "write_embeddings", "dataset_hash", "prepare_prompts",
    "load_prepared_prompts", "load_prepared_embeddings", "read_training_prompts"
]
