"""Crash-safe, resumable result store: ``OUT/run.json`` + ``OUT/samples.jsonl``.

Why it works this way:

* Every sample is one JSON line, written, flushed and fsync'ed at once, so a
  crash loses at most the sample being written. A torn last line (the process
  died mid-write) is tolerated by readers and cut off when the store is
  reopened for appending, so the next append starts on a clean line.
* ``(dataset, id, sample)`` identifies a sample. ``append`` of a key that is
  already stored is ignored and returns False: resuming never duplicates.
* ``run.json`` holds the manifest. Reopening a directory compares it with the
  new manifest; fields that change per-sample results must match, otherwise
  the store refuses with the differing fields named. Fields listed in
  ``RESUMABLE_FIELDS`` may differ: they choose *which* samples to produce
  (limit, datasets, number of samples) or describe the environment, and the
  stored manifest takes their new values (``datasets`` becomes the union).
  Any field not listed there must match, so new manifest fields are strict by
  default. Note that ``device``/``host`` may differ, so a run resumed on other
  hardware mixes timings; the report shows the latest values.
* One writer per directory: an advisory lock file (``OUT/.lock``, POSIX) makes
  a second writer fail fast instead of interleaving lines.

``JsonlAppender`` is that discipline for any resumable JSONL output (the
sample store, the paper benchmark's per-trace records): keyed lines, fsync'ed
appends, a torn tail cut off on reopening, and the directory lock held. The
store only reads and writes; grading happens before a record reaches it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Hashable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dynts.errors import DynTSError

MANIFEST_FILE = "run.json"
SAMPLES_FILE = "samples.jsonl"
LOCK_FILE = ".lock"

REQUIRED_FIELDS = (
    "dataset",
    "id",
    "sample",
    "response",
    "extracted",
    "correct",
    "gold",
    "kind",
    "stats",
)
RESUMABLE_FIELDS = frozenset(
    {
        "limit",
        "batch_size",
        "datasets",
        "samples",
        "data_dir",
        "package_version",
        "created_at",
        "updated_at",
        "argv",
        "host",
        "device",
        "notes",
        "resumes",
    }
)

Key = tuple[str, str, int]


def record_key(record: dict) -> Key:
    """The identity of a sample: (dataset, problem id, sample index)."""
    return (str(record["dataset"]), str(record["id"]), int(record["sample"]))


class JsonlAppender:
    """A resumable JSONL file: one JSON object per line, each appended, flushed and fsync'ed at once, skipped when
    its key is already stored. Holds its directory's lock (one writer per directory) until closed.

    key_of(obj): the identity of a line. is_complete(obj): whether an unterminated last line is a whole object
    (kept and terminated) rather than the torn tail of an interrupted write (cut off). keep(obj): what of each
    stored and appended line `kept()` returns, so the file is read once per writer (default: nothing)."""

    def __init__(
        self,
        path: str | os.PathLike,
        key_of: Callable[[dict], Hashable],
        is_complete: Callable[[dict], bool] = lambda obj: True,
        keep: Callable[[dict], Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self._key_of = key_of
        self._lock = threading.Lock()
        self._handle = None  # opened by the first append: refusing a run writes nothing
        self._closed = False
        self._lock_handle = _acquire_dir_lock(self.path.parent)
        try:
            _repair_torn_tail(self.path, is_complete)
            stored = read_jsonl(self.path)
            self._done = {key_of(obj) for obj in stored}
            self._keep = keep
            self._kept = [keep(obj) for obj in stored] if keep is not None else []
        except BaseException:
            _release_dir_lock(self._lock_handle)
            raise

    def done_keys(self) -> set:
        with self._lock:
            return set(self._done)

    def append(self, obj: dict, what: str = "record") -> bool:
        """Durably store one line; False (nothing written) when its key is already stored."""
        line = json.dumps(_jsonable(obj, what), ensure_ascii=False) + "\n"
        key = self._key_of(obj)
        with self._lock:
            if self._closed:
                raise DynTSError(f"{str(self.path)!r} is closed for appending")
            if key in self._done:
                return False
            if self._handle is None:
                self._handle = self.path.open("ab")
            self._handle.write(line.encode("utf-8"))
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._done.add(key)
            if self._keep is not None:
                self._kept.append(self._keep(obj))
            return True

    def kept(self) -> list:
        """keep(line) of every line stored before and appended since opening, in the order written."""
        with self._lock:
            return list(self._kept)

    def records(self) -> list[dict]:
        """Every stored line, in the order written (read from the file)."""
        return read_jsonl(self.path)

    def close(self) -> None:
        with self._lock:
            if self._handle is not None and not self._handle.closed:
                self._handle.close()
            self._closed = True
            _release_dir_lock(self._lock_handle)
            self._lock_handle = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ResultStore:
    """Append-only sample store for one run directory (see module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, manifest: dict) -> None:
        if not isinstance(manifest, dict):
            raise DynTSError("the run manifest must be a dict")
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DynTSError(f"cannot create output directory {str(self.out_dir)!r}: {exc}") from None
        new = _jsonable(manifest, "manifest")
        self._samples = JsonlAppender(self.out_dir / SAMPLES_FILE, record_key, _is_complete_record, summary_of)
        try:
            self.manifest = self._open_manifest(new)
        except BaseException:
            self._samples.close()
            raise

    # ------------------------------------------------------------------ API

    def done_keys(self) -> set[Key]:
        """Keys already stored, so a resumed run can skip them."""
        return self._samples.done_keys()

    def append(self, record: dict) -> bool:
        """Durably store one sample; False (nothing written) when its key is already stored."""
        validate_record(record)
        return self._samples.append(record)

    def records(self) -> list[dict]:
        """All stored samples, in the order they were written."""
        return self._samples.records()

    def summaries(self) -> list[dict]:
        """Every stored sample without its texts and token ids (summary_of), in the order written: what progress and
        the report need, without reading samples.jsonl again."""
        return self._samples.kept()

    def close(self) -> None:
        self._samples.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ manifest

    def _open_manifest(self, new: dict) -> dict:
        path = self.out_dir / MANIFEST_FILE
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if not path.exists():
            merged = {**new, "created_at": new.get("created_at", now), "updated_at": now}
            write_json_atomic(path, merged)
            return merged
        stored = read_manifest(self.out_dir)
        differences = manifest_differences(stored, new)
        if differences:
            listed = "; ".join(differences)
            raise DynTSError(
                f"{str(path)!r} was written by a different configuration ({listed}). "
                "Use a new --out directory, or the same settings to resume this run."
            )
        merged = dict(stored)
        for field in RESUMABLE_FIELDS & new.keys():
            merged[field] = new[field]
        if isinstance(stored.get("datasets"), list) and isinstance(new.get("datasets"), list):
            merged["datasets"] = list(dict.fromkeys([*stored["datasets"], *new["datasets"]]))
        merged["created_at"] = stored.get("created_at", now)
        merged["updated_at"] = now
        merged["resumes"] = int(stored.get("resumes", 0)) + 1
        write_json_atomic(path, merged)
        return merged


# --------------------------------------------------------------------------- #
# Module functions (readers work without the writer's lock)
# --------------------------------------------------------------------------- #


# The fields of a record that only regrading, replay and labelling read: left out of its summary.
BULKY_FIELDS = ("response", "token_ids", "prompt_ids")


def summary_of(record: dict) -> dict:
    """A record without its bulky fields: everything the metrics read (grades, answers, stats)."""
    return {k: v for k, v in record.items() if k not in BULKY_FIELDS}


def validate_record(record: dict) -> None:
    """Refuse a record that lacks fields the report and regrade need."""
    if not isinstance(record, dict):
        raise DynTSError("a sample record must be a dict")
    missing = [field for field in REQUIRED_FIELDS if field not in record]
    if missing:
        raise DynTSError(f"sample record is missing field(s): {', '.join(missing)}")
    if isinstance(record["sample"], bool) or not isinstance(record["sample"], int) or record["sample"] < 0:
        raise DynTSError(f"record field 'sample' must be a non-negative int, got {record['sample']!r}")
    if not isinstance(record["stats"], dict):
        raise DynTSError("record field 'stats' must be a dict")


def manifest_differences(stored: dict, new: dict, fields: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Human-readable differences in result-defining fields ("a.b: stored X, now Y"), nested dicts key by key:
    the one manifest comparison of every resumable output. fields: those to compare, in order (default: every
    field but RESUMABLE_FIELDS, sorted); a field absent on one side differs from one stored as null."""
    out: list[str] = []
    if fields is None:
        fields = sorted((stored.keys() | new.keys()) - RESUMABLE_FIELDS)
    for field in fields:
        _diff(field, stored.get(field, _MISSING), new.get(field, _MISSING), out)
    return out


def read_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DynTSError(f"{str(path)!r} not found: is {str(out_dir)!r} a DynTS run directory?") from None
    except ValueError as exc:
        raise DynTSError(f"{str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise DynTSError(f"{str(path)!r} does not hold a JSON object")
    return manifest


def read_records(out_dir: str | os.PathLike) -> list[dict]:
    """Stored samples; a torn (unterminated, unparsable) last line is skipped, not an error."""
    return read_jsonl(Path(out_dir) / SAMPLES_FILE)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSONL file written by JsonlAppender (none when it is absent); a torn last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            if number == len(lines):  # unterminated tail of an interrupted write
                continue
            raise DynTSError(f"{str(path)!r}: line {number} is corrupt (not JSON)") from None
        if not isinstance(record, dict):
            raise DynTSError(f"{str(path)!r}: line {number} is not a JSON object")
        records.append(record)
    return records


def rewrite_records(out_dir: str | os.PathLike, records: list[dict]) -> None:
    """Replace samples.jsonl atomically (used by regrade); holds the directory lock meanwhile."""
    out = Path(out_dir)
    handle = _acquire_dir_lock(out)
    try:
        lines = "".join(json.dumps(_jsonable(r, "record"), ensure_ascii=False) + "\n" for r in records)
        _write_atomic(out / SAMPLES_FILE, lines.encode("utf-8"))
    finally:
        _release_dir_lock(handle)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temp file + rename, so readers never see half a file."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
    _write_atomic(Path(path), text.encode("utf-8"))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temp file + rename."""
    _write_atomic(Path(path), text.encode("utf-8"))


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

_MISSING = object()


def _diff(path: str, old: Any, new: Any, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            _diff(f"{path}.{key}", old.get(key, _MISSING), new.get(key, _MISSING), out)
        return
    if _canonical_json(old) != _canonical_json(new):
        out.append(f"{path}: stored {_show(old)}, now {_show(new)}")


def _canonical_json(value: Any) -> str:
    if value is _MISSING:
        return "<missing>"
    return json.dumps(value, sort_keys=True)


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(absent)"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(obj: Any, what: str) -> Any:
    """Round-trip through JSON so tuples become lists and bad values fail here, clearly."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as exc:
        raise DynTSError(f"the {what} cannot be stored as JSON: {exc}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _is_complete_record(obj: dict) -> bool:
    return all(field in obj for field in REQUIRED_FIELDS)


def _repair_torn_tail(path: Path, is_complete: Callable[[dict], bool]) -> None:
    """Cut an unterminated last line, or terminate it when it is a complete record. Reads only the last line, so
    opening a store reads its file once (read_jsonl)."""
    if not path.exists():
        return
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if not size:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        start = _last_line_start(handle, size)
        handle.seek(start)
        try:
            tail = json.loads(handle.read())
            complete = isinstance(tail, dict) and is_complete(tail)
        except ValueError:
            complete = False
        if complete:
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n")
        else:
            handle.truncate(start)
        handle.flush()
        os.fsync(handle.fileno())


def _last_line_start(handle, size: int, block: int = 1 << 16) -> int:
    """The offset just after the last newline of a file of `size` bytes (0 when it has none), read backwards."""
    end = size
    while end > 0:
        begin = max(0, end - block)
        handle.seek(begin)
        cut = handle.read(end - begin).rfind(b"\n")
        if cut >= 0:
            return begin + cut + 1
        end = begin
    return 0


def _acquire_dir_lock(out_dir: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process guard
        return None
    handle = (out_dir / LOCK_FILE).open("a")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DynTSError(
            f"another DynTS process is writing to {str(out_dir)!r}; wait for it or use a different --out"
        ) from None
    return handle


def _release_dir_lock(handle) -> None:
    if handle is not None and not handle.closed:
        handle.close()  # closing the descriptor releases the flock
