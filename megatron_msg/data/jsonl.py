"""Strict jsonl record parsing shared by the preprocessing and tokenizer-training tools.

A bad record raises ``InvalidRecord`` with a category (counted when invalid
records are skipped) and a message; callers add the file name and line number.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = [
    "CATEGORIES",
    "InvalidRecord",
    "iter_lines",
    "line_number",
    "parse_record",
    "plan_chunks",
]

CATEGORIES = ("invalid_utf8", "malformed_json", "missing_key", "bad_value", "empty_document")


class InvalidRecord(ValueError):
    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category
        self.message = message


def parse_record(line: bytes, keys: Sequence[str]) -> dict[str, Any]:
    """The values of ``keys`` in one jsonl line: a string or a list of strings/ints each."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRecord(
            "invalid_utf8", f"invalid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"
        ) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRecord(
            "malformed_json", f"malformed JSON: {e.msg} at column {e.colno}"
        ) from None
    if not isinstance(record, dict):
        raise InvalidRecord(
            "malformed_json", f"expected a JSON object, got {type(record).__name__}"
        )
    # A lone surrogate (which no UTF-8 tokenizer accepts) can only come from a
    # \uD800-\uDFFF escape, so values are scanned only when the raw line has one.
    may_have_surrogates = b"\\ud" in line or b"\\uD" in line
    values = {}
    for key in keys:
        if key not in record:
            raise InvalidRecord("missing_key", f"missing key {key!r}")
        value = record[key]
        if not _valid_type(value):
            raise InvalidRecord(
                "bad_value",
                f"key {key!r} must be a string or a list of strings/ints, got {type(value).__name__}",
            )
        if may_have_surrogates and not _encodable(value):
            raise InvalidRecord(
                "invalid_utf8", f"key {key!r} holds a lone surrogate escape (not valid UTF-8)"
            )
        values[key] = value
    return values


def _valid_type(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list):
        return all(type(v) is int for v in value) or all(isinstance(v, str) for v in value)
    return False


def _encodable(value: str | list) -> bool:
    try:
        for text in [value] if isinstance(value, str) else value:
            if isinstance(text, str):
                text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_lines(data: bytes, base_offset: int) -> Iterator[tuple[int, bytes]]:
    """(file offset of the line start, line without newline) for each line in ``data``."""
    pos = 0
    size = len(data)
    while pos < size:
        end = data.find(b"\n", pos)
        if end < 0:
            end = size
        yield base_offset + pos, data[pos:end]
        pos = end + 1


def line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` of ``path``."""
    count = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count + 1


def plan_chunks(path: str, *, target_bytes: int) -> list[tuple[int, int]]:
    """Split ``path`` into byte ranges of about ``target_bytes``, each ending after a newline."""
    size = os.path.getsize(path)
    chunks = []
    start = 0
    with open(path, "rb") as f:
        while start < size:
            end = min(start + max(target_bytes, 1), size)
            if end < size:
                f.seek(end - 1)
                f.readline()  # a chunk ends just after the newline ending its last line
                end = f.tell()
            chunks.append((start, end))
            start = end
    return chunks
