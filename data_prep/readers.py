"""Inputs: JSON Lines (plain, .gz, .zst), Parquet, and Hugging Face `datasets` (save_to_disk dirs or
local files through `load_dataset`), read in deterministic byte-weighted ranges.

Every input is measured in "units" so that shards can be cut anywhere and stay balanced:
- JSON Lines: uncompressed bytes. A line belongs to the range that holds its first byte. While hashing a
  file we record a checkpoint (line start offset, line number) every CHECKPOINT_BYTES, so a worker can
  start near its range and still report exact line numbers.
- Parquet / HF datasets: rows spread over an estimate of their uncompressed bytes; row r sits at unit
  floor(r * units / rows).
`iter_records(info, start, end, keys)` yields (location, fields, reject) for the records of one range:
`fields` maps each requested key that the record has to its raw value; `reject` is (reason, detail,
excerpt) when the record itself is unusable (bad UTF-8, malformed JSON, blank line, not an object, a
line longer than `max_line_bytes`: read past in bounded memory, never held whole).

Compressed JSON Lines (.gz, all members; .zst, all frames) go through `DecompressingReader`, which
tells a complete file from one that ends inside a member or frame (a cut download): the scan records
that as `InputInfo.truncated`, and everything decoded before the cut is still read. Given a
`plain_copy` path, the scan also writes the decompressed bytes there (`InputInfo.plain_path`), so that
the shards of an encode seek into a plain file instead of each decompressing the input from its start.
"""

from __future__ import annotations

import bisect
import contextlib
import glob
import hashlib
import io
import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

from data_prep.common import HASH_CHUNK, PrepError

CHECKPOINT_BYTES = 4 << 20
EXCERPT_CHARS = 200
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSIONS = {".gz": "gz", ".gzip": "gz", ".zst": "zst", ".zstd": "zst"}
HF_MARKERS = ("state.json", "dataset_dict.json")
HF_BATCH_ROWS = 1024
DEFAULT_MAX_LINE_BYTES = 256 << 20  # a longer JSON line is rejected (read past in steps, never held whole)
SKIP_STEP = 1 << 20  # bytes per read while reading past a line that is too long
COMPRESSED_STEP = 64 << 10  # compressed bytes read per step (gzip)
ZSTD_INPUT_STEP = 4 << 10  # compressed bytes per zstd decoder call (its output has no other bound)
OUTPUT_STEP = 1 << 20  # at most this many bytes out of one gzip decoder call
TRUNCATED_UNIT = {"gz": "gzip member", "zst": "zstd frame"}


def set_hf_offline() -> None:
    """No network is assumed: make `datasets` / `huggingface_hub` never try to reach the Hub."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class InputSpec:
    """One resolved input: what to read and how."""

    kind: str  # jsonl | parquet | hf_disk | hf_load
    path: str  # absolute file or directory; for hf_load the user's "hf:<builder>:<pattern>" string
    compression: Optional[str] = None  # jsonl only: None | gz | zst
    builder: Optional[str] = None  # hf_load only: a packaged builder (json, csv, parquet, text, arrow)
    files: tuple = ()  # hf_load: the data files; hf_disk: the files of the directory
    hf_split: str = "train"
    hf_cache_dir: Optional[str] = None  # hf_load only: datasets' cache (default: datasets' own)


@dataclass
class InputInfo:
    """An input after the planning pass: identity (size, sha256) and the geometry used for sharding."""

    spec: InputSpec
    bytes: int  # bytes on disk (all files of a directory input)
    sha256: str
    units: int  # sharding weight, see module docstring
    records: int  # lines (jsonl) or rows (tabular)
    checkpoints: list = field(default_factory=list)  # jsonl: [[line_start_offset, line_number], ...]
    truncated: Optional[dict] = None  # compressed jsonl cut short: see `truncation_report`
    plain_path: Optional[str] = None  # compressed jsonl: its decompressed copy, when the scan wrote one

    @property
    def location_name(self) -> str:
        return "line" if self.spec.kind == "jsonl" else "row"

    def describe(self) -> dict:
        """The manifest's entry for this input (no sharding internals)."""
        out = {
            "path": self.spec.path,
            "kind": self.spec.kind,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "records": self.records,
        }
        if self.spec.compression:
            out["compression"] = self.spec.compression
            out["uncompressed_bytes"] = self.units
        if self.spec.kind in ("hf_disk", "hf_load"):
            out["split"] = self.spec.hf_split
        if self.spec.builder:
            out["builder"] = self.spec.builder
        if self.truncated:
            out["truncated"] = self.truncated
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "spec": asdict(self.spec)}

    @classmethod
    def from_dict(cls, d: dict) -> "InputInfo":
        spec = dict(d["spec"])
        spec["files"] = tuple(spec.get("files", ()))
        return cls(**{**d, "spec": InputSpec(**spec)})


# ----------------------------------------------------------------------------------------------------------
# resolving what the user named


def _jsonl_compression(path: str) -> Optional[str]:
    lower = path.lower()
    for suffix, comp in COMPRESSIONS.items():
        if lower.endswith(suffix):
            return comp
    return None


def _strip_compression(path: str) -> str:
    lower = path.lower()
    for suffix in COMPRESSIONS:
        if lower.endswith(suffix):
            return lower[: -len(suffix)]
    return lower


def _is_hf_disk_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in HF_MARKERS)


def _spec_for_file(path: str, hf_split: str) -> InputSpec:
    base = _strip_compression(path)
    if base.endswith(JSONL_SUFFIXES):
        return InputSpec("jsonl", path, compression=_jsonl_compression(path), hf_split=hf_split)
    if base.endswith(PARQUET_SUFFIXES) and _jsonl_compression(path) is None:
        return InputSpec("parquet", path, hf_split=hf_split)
    raise PrepError(
        f"unsupported input file {path}: expected .jsonl/.json/.ndjson (optionally .gz/.zst), .parquet, "
        "a directory saved with datasets' save_to_disk, or hf:<builder>:<files>"
    )


def _dir_files(path: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            out.append(os.path.join(root, name))
    return out


def resolve_inputs(values: list[str], hf_split: str = "train", hf_cache_dir: Optional[str] = None) -> list[InputSpec]:
    """Turn --input values into InputSpecs; a missing or unsupported input is a PrepError (before any work).

    Accepted: a file (.jsonl/.json/.ndjson[.gz|.zst], .parquet), a glob, a directory written by
    `Dataset.save_to_disk`, another directory (its supported files, recursively, sorted), or
    `hf:<builder>:<pattern>[,<pattern>...]` for `datasets.load_dataset(builder, data_files=...)` on local files.
    """
    if not values:
        raise PrepError("no --input given")
    specs: list[InputSpec] = []
    for value in values:
        if value.startswith("hf:"):
            parts = value.split(":", 2)
            if len(parts) != 3 or not parts[1] or not parts[2]:
                raise PrepError(f"bad input {value!r}: expected hf:<builder>:<file pattern>[,<pattern>...]")
            files: list[str] = []
            for pattern in parts[2].split(","):
                matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
                if not matched:
                    raise PrepError(f"input {value!r}: no file matches {pattern!r}")
                files.extend(os.path.abspath(m) for m in matched if os.path.isfile(m))
            specs.append(InputSpec("hf_load", value, builder=parts[1], files=tuple(files), hf_split=hf_split,
                                   hf_cache_dir=os.path.abspath(hf_cache_dir) if hf_cache_dir else None))
            continue
        path = os.path.expanduser(value)
        if any(ch in path for ch in "*?["):
            matched = sorted(glob.glob(path, recursive=True))
            if not matched:
                raise PrepError(f"input pattern {value!r} matches no file")
            for m in matched:
                if os.path.isfile(m):
                    specs.append(_spec_for_file(os.path.abspath(m), hf_split))
            continue
        if not os.path.exists(path):
            raise PrepError(f"input not found: {value}")
        path = os.path.abspath(path)
        if _is_hf_disk_dir(path):
            specs.append(InputSpec("hf_disk", path, files=tuple(_dir_files(path)), hf_split=hf_split))
        elif os.path.isdir(path):
            found = []
            for f in _dir_files(path):
                base = _strip_compression(f)
                if base.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
                    found.append(_spec_for_file(f, hf_split))
            if not found:
                raise PrepError(f"input directory {value} holds no .jsonl/.parquet file and no saved dataset")
            specs.extend(found)
        else:
            if not os.access(path, os.R_OK):
                raise PrepError(f"input not readable: {value}")
            specs.append(_spec_for_file(path, hf_split))
    return specs


# ----------------------------------------------------------------------------------------------------------
# JSON Lines


class _HashingReader(io.RawIOBase):
    """A raw reader that feeds every byte it returns into a hash (to checksum compressed inputs in the
    same pass that decompresses them)."""

    def __init__(self, f, digest):
        self._f = f
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)
        if n:
            self._digest.update(memoryview(buffer)[:n])
        return n


_decompressed_total = 0  # uncompressed bytes produced by DecompressingReaders in this process


def decompressed_bytes() -> int:
    """Uncompressed bytes this process has decompressed so far (encode reports it: one pass per input)."""
    return _decompressed_total


class DecompressingReader(io.RawIOBase):
    """The uncompressed bytes of a .gz (every member) or .zst (every frame) file object.

    gzip.GzipFile raises EOFError when the file ends inside a member, and zstandard's stream reader
    returns a clean end of file inside a frame: neither says how far the data went. This reader returns
    every byte that can be decoded, then end of file; `truncated` then tells whether the file ended
    inside a member / frame. Corrupt data raises (zlib.error, zstandard.ZstdError).
    Memory: one gzip step yields at most OUTPUT_STEP bytes; zstandard's decompressobj has no output
    bound, so .zst input is fed ZSTD_INPUT_STEP bytes at a time (text expands ~5x; a long run of one
    byte value up to 32768x).
    """

    def __init__(self, raw, compression: str):
        if compression not in TRUNCATED_UNIT:
            raise ValueError(compression)
        self._raw = raw
        self._gzip = compression == "gz"
        self._decoder = None  # the member / frame being decoded; None between them
        self._chunks = self._decoded_chunks()
        self._pending = memoryview(b"")
        self.truncated = False  # meaningful once the reader has returned end of file

    def readable(self) -> bool:
        return True

    def _new_decoder(self):
        if self._gzip:
            return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer (CRC, size)
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()

    def _decode(self, data: bytes) -> Iterator[bytes]:
        """What `data` (compressed bytes, possibly spanning members / frames) decodes to, in pieces."""
        while True:
            if self._decoder is None:
                if self._gzip:
                    data = data.lstrip(b"\0")  # zero padding after a member, as gzip tolerates
                if not data:
                    return
                self._decoder = self._new_decoder()
            if self._gzip:
                out = self._decoder.decompress(data, OUTPUT_STEP)
                rest = self._decoder.unconsumed_tail
            else:
                out, rest = self._decoder.decompress(data), b""
            if self._decoder.eof:
                rest = self._decoder.unused_data
                self._decoder = None
            if out:
                yield out
            if not rest and len(out) < OUTPUT_STEP:  # a full step may leave output for the same input
                return
            data = rest

    def _decoded_chunks(self) -> Iterator[bytes]:
        global _decompressed_total
        step = COMPRESSED_STEP if self._gzip else ZSTD_INPUT_STEP
        while chunk := self._raw.read(step):
            for out in self._decode(chunk):
                _decompressed_total += len(out)
                yield out
        self.truncated = self._decoder is not None

    def chunks(self) -> Iterator[bytes]:
        """The rest of the uncompressed bytes, in the pieces they are decoded in (no copy)."""
        if self._pending:
            yield bytes(self._pending)
            self._pending = memoryview(b"")
        yield from self._chunks

    def readinto(self, buffer) -> int:
        if not self._pending:
            self._pending = memoryview(next(self._chunks, b""))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class _LineGeometry:
    """Counts the bytes and lines of a stream fed in chunks, with a (line start, line number)
    checkpoint every CHECKPOINT_BYTES so that a reader can start near any offset."""

    def __init__(self):
        self.size = 0
        self.newlines = 0
        self.last_byte = b"\n"
        self.checkpoints = [[0, 1]]
        self._next_mark = CHECKPOINT_BYTES

    def add(self, chunk: bytes) -> None:
        import numpy as np

        starts = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + (self.size + 1)  # line starts
        while len(starts) and self._next_mark <= starts[-1]:
            j = int(np.searchsorted(starts, self._next_mark))
            start = int(starts[j])
            self.checkpoints.append([start, self.newlines + j + 2])
            self._next_mark = (start // CHECKPOINT_BYTES + 1) * CHECKPOINT_BYTES
        self.newlines += len(starts)
        self.size += len(chunk)
        self.last_byte = chunk[-1:]

    @property
    def lines(self) -> int:
        return self.newlines + (1 if self.size and self.last_byte != b"\n" else 0)


def _scan_jsonl(spec: InputSpec, plain_copy: Optional[str] = None) -> InputInfo:
    """One pass over a JSON Lines file: sha256 of the file bytes, uncompressed size, line count,
    checkpoints, whether a compressed file is cut short, and (given plain_copy) its decompressed copy."""
    digest = hashlib.sha256()
    geometry = _LineGeometry()
    plain_path = plain_copy if spec.compression else None
    truncated = None
    try:
        with open(spec.path, "rb", buffering=0) as raw_file:
            raw = io.BufferedReader(_HashingReader(raw_file, digest), HASH_CHUNK)
            if spec.compression is None:
                for chunk in iter(lambda: raw.read(HASH_CHUNK), b""):
                    geometry.add(chunk)
            else:
                reader = DecompressingReader(raw, spec.compression)
                with _PlainCopy(plain_path, spec.path) as copy:
                    for chunk in reader.chunks():
                        geometry.add(chunk)
                        copy.write(chunk)
                if reader.truncated:
                    truncated = {"unit": TRUNCATED_UNIT[spec.compression], "decompressed_bytes": geometry.size,
                                 "complete_lines": geometry.newlines}
    except PrepError:
        raise
    except OSError as err:
        raise PrepError(f"cannot read input {spec.path}: {err}") from None
    except (zlib.error, ValueError) as err:
        raise PrepError(f"cannot read input {spec.path} (corrupt {spec.compression} data?): {err}") from None
    except Exception as err:  # zstandard.ZstdError and friends
        raise PrepError(f"cannot read input {spec.path}: {type(err).__name__}: {err}") from None
    if plain_path and os.path.getsize(plain_path) != geometry.size:
        raise PrepError(f"the decompressed copy {plain_path} of {spec.path} has {os.path.getsize(plain_path):,} "
                        f"bytes, expected {geometry.size:,}")
    checkpoints = [c for c in geometry.checkpoints if c[0] < geometry.size] or [[0, 1]]
    return InputInfo(spec, os.path.getsize(spec.path), digest.hexdigest(), units=geometry.size,
                     records=geometry.lines, checkpoints=checkpoints, truncated=truncated, plain_path=plain_path)


class _PlainCopy:
    """Writes the decompressed bytes of an input to `path` (or nowhere when path is None); a failed
    write is an error naming the copy, not the input."""

    def __init__(self, path: Optional[str], source: str):
        self.path, self.source = path, source
        self._f = None

    def __enter__(self) -> "_PlainCopy":
        if self.path:
            try:
                self._f = open(self.path, "wb", buffering=HASH_CHUNK)
            except OSError as err:
                self._fail(err)
        return self

    def write(self, chunk: bytes) -> None:
        if self._f is not None:
            try:
                self._f.write(chunk)
            except OSError as err:
                self._fail(err)

    def _fail(self, err: OSError):
        raise PrepError(f"cannot write the decompressed copy of {self.source} to {self.path}: {err}") from None

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            try:
                self._f.close()  # flushes the last buffered bytes
            except OSError as err:
                self._fail(err)


def truncation_report(described: dict) -> str:
    """One line on a cut-short compressed input, from its manifest entry (`InputInfo.describe()`)."""
    t = described["truncated"]
    return (f"{described['path']} is truncated: the file ends inside a {t['unit']} after "
            f"{t['decompressed_bytes']:,} decompressed bytes ({t['complete_lines']:,} complete lines); "
            "the records before the cut are kept")


@contextlib.contextmanager
def _open_at(info: InputInfo, offset: int):
    """A binary stream of the (uncompressed) input, positioned at `offset`."""
    path = info.plain_path or info.spec.path
    with open(path, "rb") as raw:
        if info.plain_path or info.spec.compression is None:
            raw.seek(offset)
            yield raw
            return
        stream = io.BufferedReader(DecompressingReader(raw, info.spec.compression), 1 << 20)
        to_skip = offset
        while to_skip:
            got = stream.read(min(to_skip, HASH_CHUNK))
            if not got:
                break
            to_skip -= len(got)
        yield stream


def _read_line(stream, max_line_bytes: int) -> tuple[Optional[bytes], int, Optional[tuple]]:
    """The next line as (line, size in bytes, None), or (None, size, reject) when it holds more than
    max_line_bytes bytes before its newline: it is then read past in SKIP_STEP steps, never held whole."""
    line = stream.readline(max_line_bytes + 1)
    if len(line) <= max_line_bytes or line.endswith(b"\n"):
        return line, len(line), None
    size, head = len(line), line[: EXCERPT_CHARS * 4]
    while not line.endswith(b"\n"):
        line = stream.readline(SKIP_STEP)
        if not line:
            break
        size += len(line)
    length = size - (1 if line.endswith(b"\n") else 0)  # without its newline
    reject = ("line_too_long", f"line too long ({length:,} bytes > --max-line-bytes {max_line_bytes:,})",
              _excerpt(head.decode("utf-8", "replace")))
    return None, size, reject


def _iter_jsonl(info: InputInfo, start: int, end: int, keys: list[str], max_line_bytes: int) -> Iterator[tuple]:
    offsets = [c[0] for c in info.checkpoints]
    offset, line_no = info.checkpoints[max(0, bisect.bisect_right(offsets, start) - 1)]
    loads = json.loads
    with _open_at(info, offset) as stream:
        pos = offset
        while pos < end:
            line, size, too_long = _read_line(stream, max_line_bytes)
            if not size:
                break
            if pos >= start:
                yield (line_no, None, too_long) if too_long else (line_no, *_parse_json_line(line, keys, loads))
            pos += size
            line_no += 1


def _excerpt(text: str) -> str:
    return text[:EXCERPT_CHARS]


def _parse_json_line(line: bytes, keys: list[str], loads) -> tuple[Optional[dict], Optional[tuple]]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, ("invalid_utf8", f"byte {err.start}: {err.reason}", _excerpt(line.decode("utf-8", "replace")))
    if not text.strip():
        return None, ("blank_line", "line holds only whitespace", "")
    try:
        obj = loads(text)
    except (ValueError, RecursionError) as err:
        return None, ("malformed_json", str(err)[:200], _excerpt(text))
    if not isinstance(obj, dict):
        return None, ("not_an_object", f"JSON {type(obj).__name__}, expected an object", _excerpt(text))
    return {k: obj[k] for k in keys if k in obj}, None


# ----------------------------------------------------------------------------------------------------------
# Parquet and Hugging Face datasets


def _hash_files(files: list[str], root: Optional[str] = None) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    for path in files:
        name = os.path.relpath(path, root) if root else os.path.basename(path)
        digest.update(name.encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
                total += len(chunk)
    return digest.hexdigest(), total


def _scan_parquet(spec: InputSpec) -> InputInfo:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(spec.path).metadata
    except Exception as err:  # noqa: BLE001 - any pyarrow failure is a bad input
        raise PrepError(f"cannot read parquet input {spec.path}: {err}") from None
    rows = meta.num_rows
    est = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    sha, size = _hash_files([spec.path])
    return InputInfo(spec, size, sha, units=max(est, rows), records=rows)


def load_hf(spec: InputSpec):
    """Open a Hugging Face dataset input (saved directory or load_dataset on local files) as a Dataset."""
    set_hf_offline()
    import datasets

    try:
        if spec.kind == "hf_disk":
            ds = datasets.load_from_disk(spec.path)
        else:
            ds = datasets.load_dataset(spec.builder, data_files=list(spec.files), split=spec.hf_split,
                                       cache_dir=spec.hf_cache_dir)
    except Exception as err:  # noqa: BLE001
        raise PrepError(f"cannot load dataset input {spec.path}: {type(err).__name__}: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if spec.hf_split not in ds:
            raise PrepError(f"dataset {spec.path} has splits {list(ds)}, not {spec.hf_split!r} (see --hf-split)")
        ds = ds[spec.hf_split]
    return ds


def _scan_hf(spec: InputSpec) -> InputInfo:
    ds = load_hf(spec)
    rows = len(ds)
    try:
        est = int(ds.data.nbytes)
    except Exception:  # noqa: BLE001
        est = rows
    root = spec.path if spec.kind == "hf_disk" else None
    sha, size = _hash_files(list(spec.files), root)
    return InputInfo(spec, size, sha, units=max(est, rows), records=rows)


def _row_range(info: InputInfo, start: int, end: int) -> tuple[int, int]:
    """Rows whose unit position floor(r * units / rows) lies in [start, end)."""
    rows, units = info.records, info.units
    lo = -(-start * rows // units)
    hi = -(-end * rows // units)
    return min(lo, rows), min(hi, rows)


def _iter_parquet(info: InputInfo, start: int, end: int, keys: list[str]) -> Iterator[tuple]:
    import pyarrow.parquet as pq

    lo, hi = _row_range(info, start, end)
    if lo >= hi:
        return
    pf = pq.ParquetFile(info.spec.path)
    present = [k for k in keys if k in pf.schema_arrow.names]
    first = 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        rg_lo, rg_hi = max(lo, first), min(hi, first + n)
        if rg_lo < rg_hi:
            table = pf.read_row_group(rg, columns=present).slice(rg_lo - first, rg_hi - rg_lo)
            yield from _iter_table(table, present, rg_lo)
        first += n
        if first >= hi:
            break


def _iter_table(table, present: list[str], first_row: int) -> Iterator[tuple]:
    columns = [table.column(k).to_pylist() for k in present]
    for i in range(table.num_rows):
        yield first_row + i, {k: col[i] for k, col in zip(present, columns)}, None


def _iter_hf(info: InputInfo, start: int, end: int, keys: list[str]) -> Iterator[tuple]:
    lo, hi = _row_range(info, start, end)
    if lo >= hi:
        return
    ds = load_hf(info.spec)
    present = [k for k in keys if k in ds.column_names]
    ds = ds.select_columns(present).with_format("arrow")
    for b in range(lo, hi, HF_BATCH_ROWS):
        table = ds[b : min(hi, b + HF_BATCH_ROWS)]
        yield from _iter_table(table, present, b)


# ----------------------------------------------------------------------------------------------------------
# public entry points


def scan_input(spec: InputSpec, plain_copy: Optional[str] = None) -> InputInfo:
    """Measure and checksum one input (a full read of its bytes). Given the file path `plain_copy`, a
    compressed JSON Lines input is also written there decompressed, and later reads of it use that copy."""
    if spec.kind == "jsonl":
        return _scan_jsonl(spec, plain_copy)
    if spec.kind == "parquet":
        return _scan_parquet(spec)
    return _scan_hf(spec)


def iter_records(info: InputInfo, start: int, end: int, keys: list[str],
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[int, Any, Any]]:
    """Records of `info` whose position lies in units [start, end), in input order, as
    (location, fields | None, reject | None); location is a 1-based line or a 0-based row."""
    if info.spec.kind == "jsonl":
        return _iter_jsonl(info, start, end, keys, max_line_bytes)
    if info.spec.kind == "parquet":
        return _iter_parquet(info, start, end, keys)
    return _iter_hf(info, start, end, keys)


def iter_texts(infos: list[InputInfo], key: str) -> Iterator[tuple[str, int, Optional[str], Optional[str]]]:
    """Every record of every input for one key, as (source, location, text | None, reject reason | None).

    Used by the tokenizer trainer; applies the same acceptance rules as `encode` (see `check_text`).
    """
    for info in infos:
        for loc, fields, reject in iter_records(info, 0, info.units, [key]):
            if reject is not None:
                yield info.spec.path, loc, None, reject[0]
                continue
            bad = check_text(fields, key, 0)
            if bad is not None:
                yield info.spec.path, loc, None, bad[0]
            else:
                yield info.spec.path, loc, fields[key], None


def check_text(fields: dict, key: str, max_doc_chars: int) -> Optional[tuple[str, str]]:
    """Why `fields[key]` is not a usable document, as (reason, detail), or None when it is."""
    if key not in fields:
        return "missing_key", f"no field {key!r}"
    value = fields[key]
    if not isinstance(value, str):
        return "not_a_string", f"field {key!r} is {type(value).__name__}"
    if not value or value.isspace():
        return "empty_document", "empty or whitespace-only text"
    if max_doc_chars and len(value) > max_doc_chars:
        return "too_long", f"{len(value)} characters > --max-doc-chars {max_doc_chars}"
    return None
