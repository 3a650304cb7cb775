"""Calibration data: the built-in set, an uploaded JSONL file, or a hub dataset.

Chat rows are rendered with the model's own chat template here (llm-compressor would tokenize a `text`
column without one), and every sample is tokenized with truncation to max_seq_len.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.spec import CalibrationSpec

# Standard-library modules whose docstrings make the built-in calibration set: real English prose that
# ships with every CPython. pydoc_data.topics is kept out: evaluation uses it as held-out text.
_BUILTIN_SOURCES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "enum", "fractions", "functools", "heapq", "http.client", "inspect",
    "ipaddress", "itertools", "json", "logging", "os", "pathlib", "pickle", "queue", "random", "re",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip
_MIN_DOC_CHARS = 300
# One calibration row never needs more: 32768 tokens (the longest max_seq_len) are far fewer characters.
# Counted in bytes as they arrive.
MAX_LINE_CHARS = 4 * 2**20


def builtin_records(limit: int | None = None) -> list[dict[str, Any]]:
    """Chat rows generated from standard-library documentation: a question and its documented answer."""
    return list(_builtin_records()[:limit])


@functools.cache
def _builtin_records() -> tuple[dict[str, Any], ...]:
    # The same rows for the life of the process (this Python's own docs): made once, not on every submission.
    records: list[dict[str, Any]] = []
    for module_name in _BUILTIN_SOURCES:
        module = importlib.import_module(module_name)
        for name, obj in [(module_name, module), *_public_members(module)]:
            doc = inspect.getdoc(obj) or ""
            if len(doc) >= _MIN_DOC_CHARS:
                records.append(_qa_record(name, doc))
    return tuple(records)


def _public_members(module: Any) -> list[tuple[str, Any]]:
    members = []
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            members.append((f"{module.__name__}.{attr}", obj))
    return members


def _qa_record(name: str, doc: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"Explain what `{name}` in Python's standard library does."},
            {"role": "assistant", "content": doc},
        ]
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a calibration file of {"text": ...} or {"messages": [...]} rows; errors name the line."""
    if not path.is_file():
        raise EngineError(f"The calibration file '{path.name}' does not exist.", field="calibration")
    rows = JsonlRows(keep=True)
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_BYTES):
            rows.feed(chunk)
    rows.finish()
    return rows.records


_READ_BYTES = 2**20
_BOM = b"\xef\xbb\xbf"


class JsonlRows:
    """A calibration file's rows checked as its bytes arrive, in one pass: feed() each chunk (an upload as it
    streams in, a file as it is read), then finish(). Errors name the line.

    keep: the rows are kept in .records (the worker); otherwise only counted (.count, the usable rows).
    max_rows: more usable rows than this are refused. A line is never held past MAX_LINE_CHARS bytes; a UTF-8
    byte order mark at the start is skipped.
    """

    def __init__(self, *, keep: bool = False, max_rows: int | None = None) -> None:
        self.keep = keep
        self.max_rows = max_rows
        self.records: list[dict[str, Any]] = []
        self.count = 0
        self.lines = 0
        self._pending: list[bytes] = []  # the start of a line whose end has not arrived
        self._pending_bytes = 0

    def feed(self, data: bytes) -> None:
        cut = data.rfind(b"\n")
        if cut < 0:
            self._hold(data)
            return
        block = b"".join([*self._pending, data[:cut]])
        self._pending, self._pending_bytes = [], 0
        self._hold(data[cut + 1 :])
        self._take(block)

    def finish(self) -> int:
        """The usable rows, once the last line (without a newline) is read; a file without any is refused."""
        if self._pending_bytes:
            self._take(b"".join(self._pending))
            self._pending, self._pending_bytes = [], 0
        if not self.count:
            raise EngineError("The calibration file has no rows.", field="calibration")
        return self.count

    def _hold(self, part: bytes) -> None:
        if not part:
            return
        self._pending.append(part)
        self._pending_bytes += len(part)
        if self._pending_bytes > MAX_LINE_CHARS:
            self._too_long(self.lines + 1)

    def _take(self, block: bytes) -> None:
        """Complete lines: decoded at once (one C call for the block, not one per line)."""
        if self.lines == 0 and block.startswith(_BOM):
            block = block[len(_BOM) :]
        try:
            text = block.decode()
        except UnicodeDecodeError as exc:
            number = self.lines + block.count(b"\n", 0, exc.start) + 1
            raise EngineError(f"The calibration file is not UTF-8 text (line {number}).", field="calibration") from None
        for line in text.split("\n"):
            self.lines += 1
            if len(line) > MAX_LINE_CHARS:
                self._too_long(self.lines)
            line = line.strip()
            if not line:
                continue
            row = _parse_row(line, self.lines)
            self.count += 1
            if self.max_rows is not None and self.count > self.max_rows:
                raise EngineError(
                    f"The file has more than {self.max_rows:,} rows; a job calibrates on a few hundred or thousand "
                    "samples: upload fewer rows.",
                    field="calibration",
                )
            if self.keep:
                self.records.append(row)

    def _too_long(self, number: int) -> None:
        raise EngineError(
            f"Line {number} is longer than {MAX_LINE_CHARS // 2**20} MiB; split it into several rows.",
            field="calibration",
        )


# json's C scanner, which json.loads ends in after two regular-expression passes and a few checks: a sixth of
# the cost per row (an upload of a million rows is checked in the web process).
_scan_json = json.JSONDecoder().scan_once


def _parse_row(line: str, number: int) -> dict[str, Any]:
    """One stripped line."""
    try:
        row, end = _scan_json(line, 0)
    except (StopIteration, json.JSONDecodeError, RecursionError):
        row, end = None, -1
    if end != len(line):
        raise EngineError(f"Line {number}: not valid JSON ({_json_error(line)}).", field="calibration")
    if not isinstance(row, dict):
        raise EngineError(f'Line {number}: expected an object like {{"text": "..."}}.', field="calibration")
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise EngineError(f'Line {number}: "text" must be a non-empty string.', field="calibration")
        return {"text": row["text"]}
    if "messages" in row:
        messages = row["messages"]
        valid = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not valid:
            raise EngineError(
                f'Line {number}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} objects.',
                field="calibration",
            )
        return {"messages": messages}
    raise EngineError(f'Line {number}: expected a "text" or a "messages" field.', field="calibration")


def _json_error(line: str) -> str:
    """json's own words for a line its scanner refused (or ended before the end of)."""
    try:
        json.loads(line)
    except json.JSONDecodeError as exc:
        return exc.msg
    except RecursionError:
        return "nested too deeply"
    return "extra data"


def load_records(spec: CalibrationSpec) -> list[dict[str, Any]]:
    """The raw calibration rows the spec points at (not yet tokenized)."""
    if spec.kind == "builtin":
        return builtin_records()
    if spec.kind == "jsonl":
        if not spec.path:
            raise EngineError("A JSONL calibration needs a file.", field="calibration")
        return read_jsonl(Path(spec.path))
    if spec.kind == "hub":
        return _hub_records(spec)
    if spec.kind == "none":
        return []
    raise EngineError(f"Unknown calibration kind '{spec.kind}' (use builtin, jsonl, hub or none).", field="calibration")


def check_hub_dataset_id(dataset: str | None) -> str:
    """A hub dataset id by the hub's own rules, namespace/name; never a path on this server.

    Checked without touching the disk or the network, so the answer says nothing about local files.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not dataset:
        raise EngineError("A hub calibration needs a dataset id (namespace/name).", field="calibration")
    try:
        validate_repo_id(dataset)
        valid = dataset.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise EngineError(
            f"'{dataset[:100]}' is not a Hugging Face dataset id: use namespace/name (letters, digits, '-', '_', "
            "'.', at most 96 characters each), never a path.",
            field="calibration",
        )
    return dataset


def _hub_records(spec: CalibrationSpec) -> list[dict[str, Any]]:
    from engine.model_sources import hub_reachable

    check_hub_dataset_id(spec.dataset)
    if os.path.lexists(spec.dataset):
        # datasets.load_dataset would read a folder of that name relative to the working directory.
        raise EngineError(f"The calibration dataset '{spec.dataset}' was not found on the hub.", field="calibration")
    try:
        import datasets

        dataset = datasets.load_dataset(spec.dataset, split=spec.split)
    except Exception as exc:  # offline, unknown id, unknown split: all surface here
        reason = "the Hugging Face hub cannot be reached" if not hub_reachable() else str(exc)
        raise EngineError(
            f"The calibration dataset '{spec.dataset}' ({spec.split}) could not be loaded: {reason}.",
            field="calibration",
        ) from None
    if spec.column not in dataset.column_names:
        raise EngineError(
            f"The dataset has no column '{spec.column}' (columns: {', '.join(dataset.column_names)}).",
            field="calibration",
        )
    if len(dataset) < spec.samples:
        raise EngineError(
            f"The calibration dataset has {len(dataset)} rows but {spec.samples} samples were requested.",
            field="calibration",
        )
    rows = dataset.select(range(min(len(dataset), spec.samples * 4)))[spec.column]
    key = "messages" if rows and isinstance(rows[0], list) else "text"
    return [{key: value} for value in rows]


def tokenize_records(records: list[dict[str, Any]], tokenizer: Any, spec: CalibrationSpec) -> Any:
    """A datasets.Dataset of input_ids/attention_mask, chat rows rendered with the chat template."""
    import datasets

    selected = records[: spec.samples]
    encoded = [_encode(record, tokenizer, spec.max_seq_len) for record in selected]
    return datasets.Dataset.from_dict(
        {
            "input_ids": [e["input_ids"] for e in encoded],
            "attention_mask": [e["attention_mask"] for e in encoded],
        }
    )


def _encode(record: dict[str, Any], tokenizer: Any, max_len: int) -> dict[str, list[int]]:
    if "messages" in record and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        # The template already starts with the special tokens: adding them again would double the BOS.
        return tokenizer(text, truncation=True, max_length=max_len, add_special_tokens=False)
    if "messages" in record:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    else:
        text = record["text"]
    return tokenizer(text, truncation=True, max_length=max_len)


def builtin_records_code() -> str:
    """Python that makes the rows builtin_records() makes, without this package (for the model card)."""
    sources = ", ".join(repr(name) for name in _BUILTIN_SOURCES)
    return (
        "import importlib, inspect\n\n"
        "def builtin_rows():  # the service's built-in set, from the standard library's documentation\n"
        "    rows = []\n"
        f"    for module_name in [{sources}]:\n"
        "        module = importlib.import_module(module_name)\n"
        "        members = [(module_name, module)] + [\n"
        '            (f"{module_name}.{attr}", obj) for attr, obj in sorted(vars(module).items())\n'
        '            if not attr.startswith("_") and getattr(obj, "__module__", None) == module_name\n'
        "            and (inspect.isclass(obj) or inspect.isfunction(obj))\n"
        "        ]\n"
        "        for name, obj in members:\n"
        '            doc = inspect.getdoc(obj) or ""\n'
        f"            if len(doc) >= {_MIN_DOC_CHARS}:\n"
        '                question = f"Explain what `{name}` in Python\'s standard library does."\n'
        '                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": doc}]\n'
        '                rows.append({"messages": messages})\n'
        "    return rows\n\n"
        "rows = builtin_rows()\n"
    )
