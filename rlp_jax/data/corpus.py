"""Corpora as TFDS array_record datasets: the record schema, the local-corpus builder, `Corpus`.

Every corpus rlp-jax reads, local or the bundled demo, stores the same record:

| field | type | meaning |
|---|---|---|
| `text` | str (UTF-8) | the document |
| `doc_id` | int32 | stable id, unique across the corpus's splits |
| `origin` | str | where it came from (`file:line`, `file#block`, `rlp_demo/<config>`) |
| `marked_offsets` | int32[M] | character offsets of designated prompt positions (may be empty) |
| `marked_kinds` | int32[M] | kind of each marked offset; names in `Corpus.position_kind_names` |

Datasets are written by TFDS builders with `file_format='array_record'` and read back through
TFDS's data-source API (random access, no TensorFlow). Build statistics (documents per split,
records dropped as empty / duplicate / invalid UTF-8) are stored in the dataset's metadata and
exposed as `Corpus.build_stats`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from rlp_jax.data import text_files

__all__ = [
    "RECORD_FIELDS",
    "record_features",
    "LOCAL_POSITION_KINDS",
    "Corpus",
    "open_corpus",
    "LocalCorpusConfig",
    "RlpLocalCorpus",
    "plan_local_corpus",
    "build_local_corpus",
    "local_corpus_fingerprint",
    "find_built_corpora",
    "build_summary",
    "removed_if_refused",
]

log = logging.getLogger(__name__)

# Kind 0 is what every position not stored with the record gets.
LOCAL_POSITION_KINDS = ("unmarked", "marked")
_MAX_DOCUMENTS = 2**31 - 1  # doc ids travel as int32 in batches
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


def record_features() -> tfds.features.FeaturesDict:
    """The TFDS feature spec of a corpus record (see the module docstring)."""
    return tfds.features.FeaturesDict({
        "text": tfds.features.Text(),
        "doc_id": np.int32,
        "origin": tfds.features.Text(),
        "marked_offsets": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "marked_kinds": tfds.features.Tensor(shape=(None,), dtype=np.int32),
    })


RECORD_FIELDS = ("text", "doc_id", "origin", "marked_offsets", "marked_kinds")


class Corpus:
    """A built corpus: its splits as random-access data sources, kind names and build stats.

    Records read from a source are dicts with the fields of `RECORD_FIELDS`; `text` and
    `origin` arrive as UTF-8 bytes from TFDS (or as str from `Corpus.in_memory`).
    """

    def __init__(self, name: str, sources: Mapping[str, Any],
                 position_kind_names: Sequence[str], build_stats: Mapping[str, Any],
                 directory: str | None = None, fingerprint: str = ""):
        self.name = name
        self._sources = dict(sources)
        self.position_kind_names = tuple(position_kind_names)
        self.build_stats = dict(build_stats)
        self.directory = directory
        self.fingerprint = fingerprint

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._sources)

    def source(self, split: str):
        """The random-access data source of one split (`len()` and `[index]`)."""
        if split not in self._sources:
            raise KeyError(f"corpus {self.name} has no split {split!r}; use one of "
                           f"{', '.join(self._sources)}.")
        return self._sources[split]

    def num_documents(self, split: str) -> int:
        return len(self.source(split))

    @classmethod
    def in_memory(cls, splits: Mapping[str, Sequence[Mapping[str, Any]]], *,
                  name: str = "in_memory",
                  position_kind_names: Sequence[str] = LOCAL_POSITION_KINDS) -> "Corpus":
        """A corpus held in Python lists of records (tests, small experiments, other codebases).

        Each record needs `text` and `doc_id`; `origin`, `marked_offsets` and `marked_kinds`
        default to empty.
        """
        sources = {}
        for split, records in splits.items():
            sources[split] = [{
                "text": r["text"], "doc_id": int(r["doc_id"]), "origin": r.get("origin", ""),
                "marked_offsets": np.asarray(r.get("marked_offsets", ()), np.int32),
                "marked_kinds": np.asarray(r.get("marked_kinds", ()), np.int32),
            } for r in records]
        fingerprint = hashlib.sha256(repr(sorted(
            (s, [(r["doc_id"], r["text"]) for r in recs]) for s, recs in sources.items())
        ).encode()).hexdigest()[:16]
        return cls(name, sources, position_kind_names, {}, None, fingerprint)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(src)}" for s, src in self._sources.items())
        return f"Corpus({self.name}: {sizes})"


def open_corpus(directory: str | os.PathLike) -> Corpus:
    """Opens a corpus that a builder wrote (the directory holding dataset_info.json)."""
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
        raise FileNotFoundError(f"{directory} holds no built dataset (no dataset_info.json); "
                                "build it first with build_local_corpus or build_demo_corpus.")
    builder = tfds.builder_from_directory(directory)
    metadata = builder.info.metadata or {}
    sources = builder.as_data_source()
    return Corpus(
        name=f"{builder.name}/{builder.builder_config.name}" if builder.builder_config
        else builder.name,
        sources={split: sources[split] for split in builder.info.splits},
        position_kind_names=metadata.get("position_kinds", LOCAL_POSITION_KINDS),
        build_stats=metadata.get("build_stats", {}),
        directory=directory,
        fingerprint=metadata.get("fingerprint", ""),
    )


def find_built_corpora(directory: str | os.PathLike, max_depth: int = 4) -> list[str]:
    """Built datasets (folders holding dataset_info.json) at or below `directory`: a TFDS
    data_dir holds them at `<name>/<config>/<version>`."""
    root = os.path.abspath(os.fspath(directory))
    found = []
    for folder, subfolders, files in os.walk(root):
        if "dataset_info.json" in files:
            found.append(folder)
            subfolders.clear()
        elif folder[len(root):].count(os.sep) >= max_depth:
            subfolders.clear()
    return sorted(found)


def _validation_score(text: str) -> float:
    """A stable pseudo-random number in [0, 1) from the text alone (order-free split choice)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"rlp-val").digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclasses.dataclass(frozen=True)
class CorpusPlan:
    """Which scanned record goes where, decided before anything is written.

    Attributes:
      assignment: one entry per scanned record, in scan order: '' (dropped), 'train', 'validation'.
      stats: counts of files, records, documents per split, and records dropped per reason.
    """

    assignment: tuple[str, ...]
    stats: Mapping[str, int]


_READ_OPTIONS = ("text_field", "txt_documents", "marked_offsets_field")


def _scan(files_by_split: Sequence[tuple[str, Sequence[str]]], read_options: Mapping[str, Any]
          ) -> Iterator[tuple[str, text_files.SourceRecord]]:
    for split, files in files_by_split:
        for path in files:
            for record in text_files.iter_source_records(path, **read_options):
                yield split, record


def plan_local_corpus(paths: Sequence[str], validation_paths: Sequence[str] = (), *,
                      validation_fraction: float = 0.0, text_field: str = "text",
                      txt_documents: str = "file", marked_offsets_field: str | None = None
                      ) -> CorpusPlan:
    """Reads the corpus once and decides each record's split, counting what is dropped.

    Records that are empty, not valid UTF-8, or exact duplicates of an earlier record (in scan
    order: training files first) are dropped and counted. Without `validation_paths`, a record
    goes to validation when a hash of its text falls below `validation_fraction`, so the split
    does not depend on file order and duplicates always land together; when that leaves
    validation empty, the training document of the lowest hash goes there.
    """
    read_options = dict(text_field=text_field, txt_documents=txt_documents,
                        marked_offsets_field=marked_offsets_field)
    files = [("train", text_files.expand_paths(paths))]
    if validation_paths:
        files.append(("validation", text_files.expand_paths(validation_paths)))
    stats = {"files": sum(len(f) for _, f in files), "records_read": 0, "documents_train": 0,
             "documents_validation": 0, "dropped_empty": 0, "dropped_duplicate": 0,
             "dropped_invalid_utf8": 0, "blank_lines": 0}
    seen: set[bytes] = set()
    assignment: list[str] = []
    lowest: tuple[float, int] | None = None  # (validation score, index) of the lowest training document
    for file_split, record in _scan(files, read_options):
        if record.problem == "blank_line":
            stats["blank_lines"] += 1
            assignment.append("")
            continue
        stats["records_read"] += 1
        if record.problem is not None:
            stats[f"dropped_{record.problem}"] += 1
            assignment.append("")
            continue
        digest = hashlib.blake2b(record.text.encode("utf-8"), digest_size=16).digest()
        if digest in seen:
            stats["dropped_duplicate"] += 1
            assignment.append("")
            continue
        seen.add(digest)
        split = file_split
        score = _validation_score(record.text)
        if not validation_paths and score < validation_fraction:
            split = "validation"
        elif split == "train" and (lowest is None or score < lowest[0]):
            lowest = (score, len(assignment))
        stats[f"documents_{split}"] += 1
        assignment.append(split)
    if (not validation_paths and validation_fraction > 0 and stats["documents_validation"] == 0
            and stats["documents_train"] >= 2):
        # A small corpus whose hash draw left validation empty: the training document of the lowest
        # score moves (still order-free), so a fraction > 0 always gives a validation split.
        assignment[lowest[1]] = "validation"
        stats["documents_train"] -= 1
        stats["documents_validation"] += 1
    if stats["documents_train"] == 0:
        raise ValueError(f"no usable training documents in {paths} ({_dropped_summary(stats)}); "
                         "check the paths, text_field and txt_documents.")
    if (validation_paths or validation_fraction > 0) and stats["documents_validation"] == 0:
        if stats["documents_train"] == 1:
            raise ValueError("the corpus is a single document, so no validation split can be cut from it; "
                             "split .txt files into documents (txt_documents='paragraphs' or 'lines'), pass "
                             "validation_paths, or set validation_fraction=0.")
        raise ValueError(f"the validation split came out empty ({stats['documents_train']} "
                         "training documents); raise validation_fraction, pass "
                         "validation_paths, or set validation_fraction=0 for no validation split.")
    if stats["documents_train"] + stats["documents_validation"] > _MAX_DOCUMENTS:
        raise ValueError("more than 2**31 - 1 documents; split the corpus into several corpora.")
    return CorpusPlan(tuple(assignment), stats)


def _dropped_summary(stats: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in stats.items() if k.startswith("dropped_") or
                     k == "records_read")


@dataclasses.dataclass
class LocalCorpusConfig(tfds.core.BuilderConfig):
    """A local corpus: the builder's inputs (see `build_local_corpus` for their meaning)."""

    paths: tuple[str, ...] = ()
    validation_paths: tuple[str, ...] = ()
    validation_fraction: float = 0.0
    text_field: str = "text"
    txt_documents: str = "file"
    marked_offsets_field: str | None = None


def _files_fingerprint(config: LocalCorpusConfig) -> str:
    """Changes when the inputs' contents, their list, or the reading options change (a file
    touched but unchanged keeps it)."""
    parts: list[Any] = [config.validation_fraction, config.text_field, config.txt_documents,
                        config.marked_offsets_field]
    for group in (config.paths, config.validation_paths):
        files = text_files.expand_paths(group) if group else []
        parts.append([(os.path.abspath(f), _content_hash(f)) for f in files])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _content_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_corpus_fingerprint(paths: Sequence[str | os.PathLike] | str, *, validation_paths: Sequence[str] = (),
                             validation_fraction: float | None = None, text_field: str = "text",
                             txt_documents: str = "file", marked_offsets_field: str | None = None) -> str:
    """The fingerprint `build_local_corpus` would give these inputs, without building anything."""
    return _files_fingerprint(_local_config("corpus", paths, validation_paths, validation_fraction, text_field,
                                            txt_documents, marked_offsets_field))


class OfflineBuilder(tfds.core.GeneratorBasedBuilder):
    """A builder that downloads nothing; base of the local-corpus and demo builders.

    TFDS locates a builder's source file to look for download checksums; its lookup needs the
    optional `importlib_resources` package for installed packages. Naming the file directly
    avoids that dependency (there are no checksums to find).
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    # TFDS prints "Downloading and preparing dataset Unknown size ..." straight to stdout (with
    # terminal colour codes); nothing is downloaded here, so these go to the log instead.
    def _log_download_bytes(self) -> None:
        log.info("building %s/%s in %s", self.name, self.builder_config.name, self.data_dir)

    def _log_download_done(self) -> None:
        pass  # prepare_and_open says what was built


class RlpLocalCorpus(OfflineBuilder):
    """TFDS builder for a local `.txt` / `.jsonl` / `.jsonl.gz` corpus (no downloads).

    Construct with a `LocalCorpusConfig`; `build_local_corpus` does that for you.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Text, doc ids, origins and marked offsets."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=record_features(),
                                     metadata=tfds.core.MetadataDict(),
                                     description="A local text corpus prepared for rlp-jax.")

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        config: LocalCorpusConfig = self.builder_config
        plan = plan_local_corpus(
            config.paths, config.validation_paths,
            validation_fraction=config.validation_fraction, text_field=config.text_field,
            txt_documents=config.txt_documents, marked_offsets_field=config.marked_offsets_field)
        self.info.metadata.update({
            "position_kinds": list(LOCAL_POSITION_KINDS),
            "build_stats": dict(plan.stats),
            "fingerprint": _files_fingerprint(config),
        })
        splits = ["train"] + (["validation"] if plan.stats["documents_validation"] else [])
        return {split: self._generate_examples(plan, split) for split in splits}

    def _generate_examples(self, plan: CorpusPlan, split: str):
        config: LocalCorpusConfig = self.builder_config
        read_options = {k: getattr(config, k) for k in _READ_OPTIONS}
        files = [("train", text_files.expand_paths(config.paths))]
        if config.validation_paths:
            files.append(("validation", text_files.expand_paths(config.validation_paths)))
        doc_id = 0
        for assigned, (_, record) in zip(plan.assignment, _scan(files, read_options),
                                         strict=True):
            if not assigned:
                continue
            if assigned == split:
                offsets = np.asarray(record.marked_offsets, np.int32)
                yield doc_id, {
                    "text": record.text, "doc_id": doc_id, "origin": record.origin,
                    "marked_offsets": offsets,
                    "marked_kinds": np.ones_like(offsets),  # kind 1: "marked"
                }
            doc_id += 1


def build_local_corpus(paths: Sequence[str | os.PathLike] | str, data_dir: str | os.PathLike, *,
                       name: str = "corpus", validation_paths: Sequence[str] = (),
                       validation_fraction: float | None = None, text_field: str = "text",
                       txt_documents: str = "file", marked_offsets_field: str | None = None,
                       overwrite: bool = False) -> Corpus:
    """Builds (or reopens) a local corpus as an array_record TFDS dataset and opens it.

    Args:
      paths: training files, directories (searched recursively) or glob patterns of `.txt`,
        `.jsonl`, `.jsonl.gz` files.
      data_dir: where TFDS datasets live; the corpus goes to
        `<data_dir>/rlp_local_corpus/<name>/1.0.0`.
      name: the corpus name (lowercase letters, digits, `_ - .`).
      validation_paths: files for the validation split. Without them, `validation_fraction`
        (default 0.01) of the documents, chosen by a hash of their text, form it; 0 means no
        validation split.
      text_field: jsonl field holding the document (`a.b` for nested objects).
      txt_documents: a `.txt` file is one document (`file`), one per blank-line-separated
        paragraph (`paragraphs`; older name `blank_line_blocks`) or one per line (`lines`).
      marked_offsets_field: optional jsonl field with character offsets for the `marked`
        position strategy.
      overwrite: rebuild even if an identical corpus exists. A corpus built from other
        contents or options is always rebuilt (it is a cache of the inputs, never reused stale).

    Returns:
      The opened `Corpus`; `corpus.build_stats` counts documents per split and dropped records.
    """
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"corpus name {name!r} is not allowed; use lowercase letters, digits, "
                         "'_', '-' or '.', starting with a letter or digit.")
    config = _local_config(name, paths, validation_paths, validation_fraction, text_field, txt_documents,
                           marked_offsets_field)
    builder = RlpLocalCorpus(config=config, data_dir=os.fspath(data_dir),
                             file_format="array_record")
    return prepare_and_open(builder, _files_fingerprint(config), overwrite)


def _local_config(name, paths, validation_paths, validation_fraction, text_field, txt_documents,
                  marked_offsets_field) -> LocalCorpusConfig:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(validation_paths, (str, os.PathLike)):
        validation_paths = [validation_paths]
    if validation_paths and validation_fraction:
        raise ValueError("pass either validation_paths or validation_fraction, not both.")
    if validation_fraction is None:
        validation_fraction = 0.0 if validation_paths else 0.01
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction is {validation_fraction}; use a value in [0, 1).")
    return LocalCorpusConfig(
        name=name, paths=tuple(os.fspath(p) for p in paths),
        validation_paths=tuple(os.fspath(p) for p in validation_paths),
        validation_fraction=float(validation_fraction), text_field=text_field,
        txt_documents=txt_documents, marked_offsets_field=marked_offsets_field)


def prepare_and_open(builder: tfds.core.DatasetBuilder, fingerprint: str,
                      overwrite: bool) -> Corpus:
    """Writes the dataset unless an identical one exists (one built from other inputs is
    replaced); shared by the local and demo builders."""
    directory = os.fspath(builder.data_dir)
    if os.path.isfile(os.path.join(directory, "dataset_info.json")):
        existing = open_corpus(directory)
        if existing.fingerprint == fingerprint and not overwrite:
            return existing
        if existing.fingerprint != fingerprint:
            log.info("%s was built from other inputs or options; rebuilding it", directory)
        shutil.rmtree(directory)
    tfds.disable_progress_bar()  # tqdm bars become escape codes in a log file
    with removed_if_refused(builder.data_dir, builder.data_dir_root / "downloads"):
        builder.download_and_prepare()
    corpus = open_corpus(directory)
    built, dropped = build_summary(corpus.build_stats)
    log.info("built corpus %s in %s: %s", corpus.name, directory, built)
    if dropped:
        log.warning("corpus %s %s", corpus.name, dropped)
    return corpus


@contextlib.contextmanager
def removed_if_refused(*paths: str | os.PathLike):
    """Runs the block; if it raises, removes the folders on the way to `paths` that did not exist
    before it, so that bad input writes nothing."""
    created = {_outermost_missing(os.path.abspath(os.fspath(p))) for p in paths} - {None}
    try:
        yield
    except BaseException:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _outermost_missing(path: str) -> str | None:
    missing = None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


_DROP_REASONS = {"dropped_empty": "empty", "dropped_duplicate": "duplicate",
                 "dropped_invalid_utf8": "not valid UTF-8"}


def build_summary(stats: Mapping[str, int]) -> tuple[str, str | None]:
    """What a corpus build made (`"120 training and 6 validation documents from 3 files"`), and
    what it dropped (`"dropped 3 of 129 records (2 empty, 1 duplicate)"`; None if nothing)."""
    splits = [f"{stats[f'documents_{split}']:,} {label}" for split, label in
              (("train", "training"), ("validation", "validation")) if f"documents_{split}" in stats]
    built = " and ".join(splits) + " documents"
    if "files" in stats:
        built += f" from {stats['files']:,} file" + ("s" if stats["files"] != 1 else "")
    dropped = [f"{stats[key]:,} {reason}" for key, reason in _DROP_REASONS.items() if stats.get(key)]
    if not dropped:
        return built, None
    total = sum(stats.get(key, 0) for key in _DROP_REASONS)
    read = f" of {stats['records_read']:,}" if "records_read" in stats else ""
    return built, f"dropped {total:,}{read} records ({', '.join(dropped)})"
