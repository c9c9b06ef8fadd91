"""Reading local text corpora: `.txt`, `.jsonl` and `.jsonl.gz` files into source records.

Pure readers: they yield every record with its origin (`file:line`, `file#block`) and flag, rather
than drop, records that are empty or not valid UTF-8, so that the corpus builder can count them.
Malformed input that cannot be a record (bad JSON, a missing text field) raises a ValueError that
names the file and line.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import zlib
from typing import Iterator, Literal, Sequence

__all__ = ["SourceRecord", "SUFFIXES", "TXT_DOCUMENTS", "expand_paths", "iter_source_records"]

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
# How a .txt file is cut into documents: the whole file, each blank-line-separated paragraph
# ("blank_line_blocks" is the older name of "paragraphs"), or each non-empty line.
TxtDocuments = Literal["file", "paragraphs", "blank_line_blocks", "lines"]
TXT_DOCUMENTS = ("file", "paragraphs", "lines")

# A blank line: a line break, optional spaces or tabs, a line break.
_BLANK_LINE_BYTES = re.compile(rb"\r?\n[ \t]*\r?\n")

Problem = Literal["empty", "invalid_utf8", "blank_line"]


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """One candidate document read from a file.

    Attributes:
      origin: where it came from: `path:line` (jsonl lines and txt blocks, 1-based), or `path`.
      text: the document, or None when it is not valid UTF-8.
      problem: None for a usable record; else `empty` (nothing but whitespace), `invalid_utf8`, or
        `blank_line` (an empty jsonl line, which is not a record but is counted).
      marked_offsets: character offsets stored with the record (jsonl `marked_offsets_field`).
    """

    origin: str
    text: str | None
    problem: Problem | None = None
    marked_offsets: tuple[int, ...] = ()


def _suffix(path: str) -> str | None:
    return next((s for s in SUFFIXES if path.endswith(s)), None)


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Files, directories (searched recursively for known suffixes) and glob patterns, expanded to
    a sorted, duplicate-free list of files in the order given. Raises when something matches
    nothing or a file has an unknown suffix."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[str] = []
    for entry in paths:
        entry = os.fspath(entry)
        if os.path.isdir(entry):
            matches = sorted(os.path.join(root, name) for root, _, names in os.walk(entry)
                             for name in names if _suffix(name))
            if not matches:
                raise ValueError(f"directory {entry} holds no {', '.join(SUFFIXES)} files; point "
                                 "at a directory with corpus files or list the files.")
        elif os.path.isfile(entry):
            if not _suffix(entry):
                raise ValueError(f"{entry} is not a {', '.join(SUFFIXES)} file; convert it or "
                                 "rename it to say its format.")
            matches = [entry]
        else:
            matches = sorted(m for m in glob.glob(entry, recursive=True) if os.path.isfile(m))
            if not matches:
                raise ValueError(f"no corpus file matches {entry}; check the path.")
            unknown = [m for m in matches if not _suffix(m)]
            if unknown:
                raise ValueError(f"{unknown[0]} (matched by {entry}) is not a "
                                 f"{', '.join(SUFFIXES)} file; narrow the pattern.")
        found.extend(m for m in matches if m not in found)
    return found


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _text_record(origin: str, data: bytes) -> SourceRecord:
    text = _decode(data)
    if text is None:
        return SourceRecord(origin, None, "invalid_utf8")
    if not text.strip():
        return SourceRecord(origin, text, "empty")
    return SourceRecord(origin, text)


def _iter_txt(path: str, txt_documents: TxtDocuments) -> Iterator[SourceRecord]:
    with open(path, "rb") as f:
        data = f.read()
    if txt_documents == "file":
        yield _text_record(path, data)
        return
    if txt_documents == "lines":
        for number, line in enumerate(data.split(b"\n"), start=1):
            line = line.rstrip(b"\r")
            if line.strip():  # blank lines separate documents; they are not empty documents
                yield _text_record(f"{path}:{number}", line)
        return
    block_start = 0
    for separator in [*_BLANK_LINE_BYTES.finditer(data), None]:
        block_end = len(data) if separator is None else separator.start()
        block = data[block_start:block_end]
        stripped = block.lstrip(b"\r\n")
        if stripped.strip():
            first_line = data.count(b"\n", 0, block_start + len(block) - len(stripped)) + 1
            yield _text_record(f"{path}:{first_line}", stripped.rstrip(b"\r\n"))
        # Whitespace-only stretches between blank lines are separators, not empty documents.
        if separator is not None:
            block_start = separator.end()


def _field(obj: dict, dotted: str):
    value = obj
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(key)
        value = value[key]
    return value


def _iter_jsonl(path: str, text_field: str, marked_offsets_field: str | None
                ) -> Iterator[SourceRecord]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                origin = f"{path}:{number}"
                line = raw.rstrip(b"\r\n")
                if not line.strip():
                    yield SourceRecord(origin, None, "blank_line")
                    continue
                decoded = _decode(line)
                if decoded is None:
                    yield SourceRecord(origin, None, "invalid_utf8")
                    continue
                yield _json_record(origin, decoded, text_field, marked_offsets_field)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a readable gzip file ({err}); re-compress it or "
                         "store it as plain .jsonl.") from None


def _json_record(origin: str, line: str, text_field: str, marked_offsets_field: str | None
                 ) -> SourceRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{origin}: malformed JSON ({err.msg} at column {err.colno}); fix or "
                         "remove that line.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{origin}: expected a JSON object per line, got "
                         f"{type(obj).__name__}; write one object per line.")
    try:
        text = _field(obj, text_field)
    except KeyError:
        raise ValueError(f"{origin}: no {text_field!r} field (keys: {sorted(obj)}); set "
                         "text_field to the field that holds the document.") from None
    if not isinstance(text, str):
        raise ValueError(f"{origin}: field {text_field!r} holds {type(text).__name__}, not text; "
                         "set text_field to a string field.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
        return SourceRecord(origin, None, "invalid_utf8")
    if not text.strip():
        return SourceRecord(origin, text, "empty")
    offsets: tuple[int, ...] = ()
    if marked_offsets_field is not None:
        offsets = _marked_offsets(origin, obj, marked_offsets_field, len(text))
    return SourceRecord(origin, text, None, offsets)


def _marked_offsets(origin: str, obj: dict, field: str, text_length: int) -> tuple[int, ...]:
    try:
        raw = _field(obj, field)
    except KeyError:
        return ()  # a record without marked positions has none
    if not isinstance(raw, list) or not all(isinstance(o, int) and not isinstance(o, bool)
                                            for o in raw):
        raise ValueError(f"{origin}: field {field!r} must be a list of integer character "
                         "offsets; fix the record or unset marked_offsets_field.")
    bad = [o for o in raw if not 0 <= o < text_length]
    if bad:
        raise ValueError(f"{origin}: marked offset {bad[0]} lies outside the text's "
                         f"{text_length} characters; fix the record's offsets.")
    return tuple(raw)


def iter_source_records(path: str, *, text_field: str = "text",
                        txt_documents: TxtDocuments = "file",
                        marked_offsets_field: str | None = None) -> Iterator[SourceRecord]:
    """Every record of one corpus file, in file order.

    Args:
      path: a `.txt`, `.jsonl` or `.jsonl.gz` file.
      text_field: the jsonl field holding the document (dots reach into nested objects: `a.b`).
      txt_documents: a `.txt` file holds one document (`file`), one per blank-line-separated
        paragraph (`paragraphs`, also called `blank_line_blocks`), or one per non-empty line
        (`lines`).
      marked_offsets_field: optional jsonl field with a list of character offsets that the
        `marked` position strategy will use.
    """
    if txt_documents not in (*TXT_DOCUMENTS, "blank_line_blocks"):
        raise ValueError(f"txt_documents is {txt_documents!r}; use one of {', '.join(TXT_DOCUMENTS)}.")
    suffix = _suffix(path)
    if suffix == ".txt":
        return _iter_txt(path, txt_documents)
    if suffix in (".jsonl", ".jsonl.gz"):
        return _iter_jsonl(path, text_field, marked_offsets_field)
    raise ValueError(f"{path} is not a {', '.join(SUFFIXES)} file; convert it or rename it to "
                     "say its format.")
