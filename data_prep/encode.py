"""`fpa-prep encode`: tokenize inputs into Megatron indexed-dataset shards with N spawned workers, resumably.

Sharding is a pure function of the inputs and --num-shards: the inputs are laid end to end in "units"
(see readers.py) and shard k takes units [k*T//N, (k+1)*T//N), so shards do not depend on the worker
count and `merge` of the shards in order equals a single-shard encode. Per shard and text key the worker
writes `<name>_<NNNNN>.bin/.idx` (`<name>_<key>_<NNNNN>` with several keys) under temp names, renames them
when complete, then writes `.state/shard_<NNNNN>.json` last: that file is the commit point. A re-run with
the same arguments (same fingerprint) skips committed shards and redoes the others, so a killed run ends
byte-identical to an uninterrupted one. `manifest.json` is rewritten after every shard.

Every record that does not become a document is a reject written to `rejects.jsonl` (source, line or
row, key, reason) and counted in the manifest and the summary. A document longer than --piece-chars is
tokenized in pieces (bounded token memory) and still stored as one sequence; it is only rejected when
it exceeds --max-doc-chars. A JSON line longer than --max-line-bytes is rejected without being held in
memory. A .gz / .zst input that ends inside a member / frame is encoded up to the cut and reported as a
`truncated_input` reject (and in its manifest entry and the summary), so --strict exits 3.

Compressed inputs are decompressed once per run: the parent's scan (which must read every byte anyway
to count lines and checksum) also writes a decompressed copy into `<out-dir>/.decompressed-*/`, the
shards seek into it, and it is removed when the run ends (or by the next run, after a kill).

Several machines: with a task (see tasks.py: --task-index / --num-tasks, or the environment), the run
encodes only that task's shards of the same plan, into the same directory, and records them in its own
manifest part instead of `manifest.json` and `rejects.jsonl`; it touches no other task's files (temp
files, decompressed copies). `fpa-prep merge` checks the parts and writes those two files (gather.py),
byte-identical to a one-machine encode's.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Optional

from data_prep.common import PrepError, atomic_write_json, ensure_writable_dir, fsync_close
from data_prep.indexed import WRITERS, bin_path, idx_path
from data_prep.quiet import quiet_optional_dependency_warnings
from data_prep.readers import (DEFAULT_MAX_LINE_BYTES, InputInfo, check_text, decompressed_bytes, iter_records,
                               resolve_inputs, scan_input, truncation_report)
from data_prep.tasks import Task
from data_prep.tokenizer import load_tokenizer, tokenizer_info

FORMAT_VERSION = 1
STATE_DIR = ".state"
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
PROGRESS_INTERVAL_S = 0.25
EXIT_STRICT_REJECTS = 3
DECOMPRESSED_DIR_PREFIX = ".decompressed-"  # this run's decompressed copies of compressed inputs
TRUNCATED_INPUT = "truncated_input"  # the reject reason of a compressed input cut short


@dataclass
class EncodeOptions:
    """Arguments of `fpa-prep encode` (see cli.py for their help)."""

    inputs: list
    tokenizer: str
    out_dir: str
    name: str = "data"
    text_keys: list = field(default_factory=lambda: ["text"])
    num_shards: int = 0  # 0: automatic, from the input size only
    workers: int = 0  # 0: every core
    max_doc_chars: int = 0  # 0: no limit
    piece_chars: int = 1_000_000
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    index_writer: str = "native"
    max_line_bytes: int = 0  # 0: readers.DEFAULT_MAX_LINE_BYTES
    hf_split: str = "train"
    hf_cache_dir: Optional[str] = None
    eod_piece: Optional[str] = None
    task: Optional[Task] = None  # None: every shard (one machine); else only this task's (tasks.py)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def auto_num_shards(total_units: int) -> int:
    """About one shard per 64 MiB, at least min(16, one per MiB) so small corpora still use the cores."""
    mib = 1 << 20
    n = math.ceil(total_units / (64 * mib))
    n = max(n, min(16, math.ceil(total_units / mib)))
    return max(1, n)


def safe_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) or "_"


def shard_prefix_name(name: str, keys: list, key: str, index: int) -> str:
    """File name prefix (no directory) of one shard's dataset for one key."""
    if len(keys) == 1:
        return f"{name}_{index:05d}"
    return f"{name}_{safe_key(key)}_{index:05d}"


def merged_prefix_name(name: str, keys: list, key: str) -> str:
    """The default prefix `merge` writes for one key: `<name>` or `<name>_<key>`."""
    return name if len(keys) == 1 else f"{name}_{safe_key(key)}"


def plan_shards(units: list[int], num_shards: int) -> list[list[tuple[int, int, int]]]:
    """For each shard, the (input index, local start, local end) unit ranges it covers."""
    total = sum(units)
    bases = [0]
    for u in units:
        bases.append(bases[-1] + u)
    plan = []
    for k in range(num_shards):
        a, b = k * total // num_shards, (k + 1) * total // num_shards
        segments = []
        for i, u in enumerate(units):
            lo, hi = max(a, bases[i]), min(b, bases[i] + u)
            if lo < hi:
                segments.append((i, lo - bases[i], hi - bases[i]))
        plan.append(segments)
    return plan


# ----------------------------------------------------------------------------------------------------------
# worker side (spawned processes: numpy + sentencepiece or tokenizers only)

_progress_queue = None
_processors: dict = {}


def _init_worker(progress_queue, tokenizer_path: str, eod_piece: str) -> None:
    global _progress_queue

    quiet_optional_dependency_warnings()  # --index-writer megatron imports megatron.core in the worker
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _progress_queue = progress_queue
    _processor(tokenizer_path, eod_piece)


def _noop() -> None:
    """Submitted once per worker at pool start: makes the pool spawn its processes right away."""


def _processor(path: str, eod_piece: str):
    """The worker's tokenizer for `path` (sentencepiece or tokenizer.json) with the run's EOD, loaded once."""
    if (path, eod_piece) not in _processors:
        _processors[path, eod_piece] = load_tokenizer(path, eod_piece)
    return _processors[path, eod_piece]


def split_points(text: str, piece_chars: int) -> list[tuple[int, int]]:
    """Cut a long text into [start, end) pieces of at most piece_chars, preferably right before a space
    that follows a non-space (a word boundary for sentencepiece), so pieces tokenize like the whole."""
    out = []
    pos, n = 0, len(text)
    while n - pos > piece_chars:
        hi = pos + piece_chars
        lo = pos + piece_chars // 2
        cut = text.rfind(" ", lo, hi)
        while cut > lo and text[cut - 1] == " ":
            cut = text.rfind(" ", lo, cut)
        if cut <= pos:
            cut = hi
        out.append((pos, cut))
        pos = cut
    out.append((pos, n))
    return out


def _pieces(tok, text: str, piece_chars: int, eod: int, dtype):
    import numpy as np

    for start, end in split_points(text, piece_chars):
        piece = text[start:end]
        if start > 0 and tok.dummy_prefix and piece.startswith(" "):
            piece = piece[1:]  # the model's dummy prefix stands for this space
        yield np.array(tok.encode(piece), dtype=dtype)
    yield np.array([eod], dtype=dtype)


def _report(shard: int, records: int, tokens: int) -> None:
    if _progress_queue is not None:
        try:
            _progress_queue.put_nowait((shard, records, tokens))
        except Exception:  # noqa: BLE001 - progress is best effort
            pass


def encode_shard(job: dict) -> dict:
    """Encode one shard (run in a worker): its datasets, rejects and commit record. Returns its stats,
    plus the bytes this shard decompressed (not part of the commit record)."""
    before = decompressed_bytes()
    shard = ShardEncoder(job)
    for input_dict, start, end in job["segments"]:
        shard.encode_range(InputInfo.from_dict(input_dict), start, end)
    return {**shard.commit(), "decompressed_bytes": decompressed_bytes() - before}


class ShardEncoder:
    """The records of one shard -> one indexed dataset per text key, a rejects file and a commit record.

    Files are written under temp names; `commit` publishes them by rename, then writes
    `.state/shard_<NNNNN>.json` last (the commit point a resumed encode trusts).
    """

    def __init__(self, job: dict):
        import numpy as np

        self.job = job
        self.index = job["index"]
        self.keys = job["keys"]
        self.dtype = np.dtype(job["dtype"])
        self.tok = _processor(job["tokenizer"], job["eod_piece"])
        self.prefixes = {k: os.path.join(job["out_dir"], p) for k, p in job["prefixes"].items()}
        writer_cls = WRITERS[job["index_writer"]]
        self.writers = {k: writer_cls(bin_path(p) + ".tmp", self.dtype.name) for k, p in self.prefixes.items()}
        self.rejects_path = os.path.join(job["out_dir"], STATE_DIR, f"rejects_{self.index:05d}.jsonl")
        self.rejects_file = open(self.rejects_path + ".tmp", "w", encoding="utf-8")
        self.reasons: Counter = Counter()
        self.documents = dict.fromkeys(self.keys, 0)
        self.tokens = dict.fromkeys(self.keys, 0)
        self.records = 0
        self.long_docs = 0
        self.longest = 0
        self._unreported = [0, 0]  # records, tokens not yet sent to the progress bar
        self._last_report = time.monotonic()

    def encode_range(self, info, start: int, end: int) -> None:
        """Every record of `info` in units [start, end)."""
        for loc, fields, bad_record in iter_records(info, start, end, self.keys, self.job["max_line_bytes"]):
            self.records += 1
            self._unreported[0] += 1
            if bad_record is not None:
                self.reject(info, loc, None, *bad_record)
            else:
                for key in self.keys:
                    self.encode_field(info, loc, fields, key)
            self._maybe_report()

    def encode_field(self, info, loc, fields: dict, key: str) -> None:
        """One document from fields[key], or a reject saying why not."""
        bad = check_text(fields, key, self.job["max_doc_chars"])
        if bad is not None:
            value = fields.get(key)
            self.reject(info, loc, key, *bad, excerpt=value[:200] if isinstance(value, str) else "")
            return
        text = fields[key]
        try:
            n = self._write_document(key, text)
        except (RuntimeError, UnicodeError, TypeError):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # a lone surrogate from a JSON escape: the tokenizer refuses it
                self.reject(info, loc, key, "invalid_unicode", f"char {err.start}: {err.reason}",
                            text[:200].encode("utf-8", "replace").decode("utf-8"))
                return
            raise
        self.documents[key] += 1
        self.tokens[key] += n
        self._unreported[1] += n

    def _write_document(self, key: str, text: str) -> int:
        """Tokenize `text` + EOD into the key's dataset (in pieces when long); returns its token count."""
        import numpy as np

        piece_chars = self.job["piece_chars"]
        if len(text) <= piece_chars:
            ids = self.tok.encode(text)
            ids.append(self.job["eod_id"])
            self.writers[key].add_document(np.array(ids, dtype=self.dtype))
            return len(ids)
        pieces = _pieces(self.tok, text, piece_chars, self.job["eod_id"], self.dtype)
        n = self.writers[key].add_document_pieces(pieces)
        self.long_docs += 1
        self.longest = max(self.longest, len(text))
        return n

    def reject(self, info, loc, key, reason: str, detail: str, excerpt: str = "") -> None:
        self.reasons[reason] += 1
        entry = {"source": info.spec.path, info.location_name: loc, "key": key, "reason": reason,
                 "detail": detail, "excerpt": excerpt, "shard": self.index}
        self.rejects_file.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def _maybe_report(self) -> None:
        if self._unreported[0] >= 64 and time.monotonic() - self._last_report >= PROGRESS_INTERVAL_S:
            _report(self.index, *self._unreported)
            self._unreported = [0, 0]
            self._last_report = time.monotonic()

    def commit(self) -> dict:
        """Finish the temp files, publish them by rename, then write the commit record; returns it."""
        files, published = {}, {}
        for key, writer in self.writers.items():
            p = self.prefixes[key]
            if self.documents[key] == 0:  # Megatron cannot mmap an empty .bin: an empty shard has no files
                writer.abort()
                os.unlink(bin_path(p) + ".tmp")
                continue
            writer.finalize(idx_path(p) + ".tmp")
            for final in (bin_path(p), idx_path(p)):
                os.replace(final + ".tmp", final)
                files[os.path.basename(final)] = os.path.getsize(final)
            published[key] = self.job["prefixes"][key]
        fsync_close(self.rejects_file)
        os.replace(self.rejects_path + ".tmp", self.rejects_path)
        stats = {
            "index": self.index,
            "fingerprint": self.job["fingerprint"],
            "records": self.records,
            "documents": self.documents,
            "tokens": self.tokens,
            "rejects": dict(sorted(self.reasons.items())),
            "rejects_total": sum(self.reasons.values()),
            "long_documents": self.long_docs,
            "longest_long_document_chars": self.longest,
            "files": files,
            "prefixes": published,
            "segments": [[s[0]["spec"]["path"], s[1], s[2]] for s in self.job["segments"]],  # input, unit range
        }
        atomic_write_json(os.path.join(self.job["out_dir"], STATE_DIR, f"shard_{self.index:05d}.json"), stats)
        _report(self.index, *self._unreported)
        return stats


# ----------------------------------------------------------------------------------------------------------
# parent side


def _fingerprint(settings: dict, inputs: list[dict], tokenizer: dict) -> str:
    ident = {"settings": settings, "inputs": inputs, "tokenizer_sha256": tokenizer["sha256"]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _load_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _shard_done(out_dir: str, index: int, fingerprint: str) -> Optional[dict]:
    """The commit record of a shard if it belongs to this run and its files are all there, else None."""
    state = _load_json(os.path.join(out_dir, STATE_DIR, f"shard_{index:05d}.json"))
    if not state or state.get("fingerprint") != fingerprint:
        return None
    for name, size in state.get("files", {}).items():
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return None
    if not os.path.isfile(os.path.join(out_dir, STATE_DIR, f"rejects_{index:05d}.jsonl")):
        return None
    return state


def _clean_temps(out_dir: str, owned: Optional[tuple] = None) -> None:
    """Remove the temp files a killed run left; with `owned` (name prefixes), only those (a task's own)."""
    for d in (out_dir, os.path.join(out_dir, STATE_DIR)):
        for entry in os.listdir(d):
            if entry.endswith(".tmp") and (owned is None or entry.startswith(owned)):
                os.unlink(os.path.join(d, entry))


def _task_temp_prefixes(task: Task, shards: list[int], name: str, keys: list) -> tuple:
    """Name prefixes of every temp file a task may leave: its shards' datasets, rejects, commit records
    (atomic_write_json's `.<name>.<random>.tmp`), and its manifest part."""
    out = [f".{task.part_name}."]
    for k in shards:
        out += [shard_prefix_name(name, keys, key, k) + "." for key in keys]
        out += [f"rejects_{k:05d}.jsonl.", f".shard_{k:05d}.json."]
    return tuple(out)


def _remove_previous(out_dir: str, old: dict) -> None:
    """--overwrite: remove what an earlier, different encode left in out_dir."""
    for shard in old.get("shards", []):
        for name in shard.get("files", []):
            path = os.path.join(out_dir, name)
            if os.path.isfile(path):
                os.unlink(path)
    for d in old.get("datasets", {}).values():  # a merged prefix made from the old shards is stale too
        for ext in (".bin", ".idx"):
            path = os.path.join(out_dir, d.get("merged_prefix", "") + ext)
            if d.get("merged_prefix") and os.path.isfile(path):
                os.unlink(path)
    state = os.path.join(out_dir, STATE_DIR)
    if os.path.isdir(state):
        for entry in os.listdir(state):
            os.unlink(os.path.join(state, entry))
    for name in (REJECTS, MANIFEST):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.unlink(path)


def _diff(old: dict, new: dict) -> str:
    parts = []
    for k in sorted(set(old.get("settings", {})) | set(new["settings"])):
        a, b = old.get("settings", {}).get(k), new["settings"].get(k)
        if a != b:
            parts.append(f"{k}: {a!r} -> {b!r}")
    if [i.get("sha256") for i in old.get("inputs", [])] != [i["sha256"] for i in new["inputs"]]:
        parts.append("inputs differ (paths or checksums)")
    if old.get("tokenizer", {}).get("sha256") != new["tokenizer"]["sha256"]:
        parts.append("tokenizer differs")
    return "; ".join(parts) or "fingerprint differs"


def _manifest(base: dict, states: dict, num_shards: int, keys: list) -> dict:
    shards = []
    reasons: Counter = Counter()
    datasets = {k: {"documents": 0, "tokens": 0, "shards": []} for k in keys}
    long_docs, longest, records = 0, 0, 0
    for k in range(num_shards):
        s = states.get(k)
        if s is None:
            shards.append({"index": k, "status": "pending"})
            continue
        shards.append({
            "index": k,
            "status": "done",
            "records": s["records"],
            "documents": s["documents"],
            "tokens": s["tokens"],
            "rejects": s["rejects_total"],
            "files": s["files"],
        })
        reasons.update(s["rejects"])
        records += s["records"]
        long_docs += s["long_documents"]
        longest = max(longest, s["longest_long_document_chars"])
        for key in keys:
            datasets[key]["documents"] += s["documents"][key]
            datasets[key]["tokens"] += s["tokens"][key]
    truncated = sum(1 for i in base["inputs"] if i.get("truncated"))
    if truncated:
        reasons[TRUNCATED_INPUT] += truncated
    for key in keys:
        # shards without a document for this key have no files (Megatron cannot read an empty dataset)
        datasets[key]["shards"] = [states[k]["prefixes"][key] for k in sorted(states) if key in states[k]["prefixes"]]
        datasets[key]["empty_shards"] = [k for k in sorted(states) if key not in states[k]["prefixes"]]
        datasets[key]["merged_prefix"] = merged_prefix_name(base["settings"]["name"], keys, key)
    done = len(states) == num_shards
    return {
        **base,
        "status": "complete" if done else "incomplete",
        "shards_done": len(states),
        "records": records,
        "datasets": datasets,
        "rejects": {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items())), "file": REJECTS},
        "long_documents": {"count": long_docs, "longest_chars": longest,
                           "piece_chars": base["settings"]["piece_chars"]},
        "shards": shards,
    }


def task_part(base: dict, task: Task, own: list[int], states: dict) -> dict:
    """A task's manifest part: the run's identity, the task, its planned shards, the commit records of
    those done."""
    done = [k for k in own if k in states]
    return {
        **base,
        "task": {"index": task.index, "count": task.count},
        "status": "complete" if len(done) == len(own) else "incomplete",
        "shards_planned": own,
        "shards_done": done,
        "shard_records": {str(k): states[k] for k in done},
    }


def _ranges(indices: list[int]) -> str:
    """[0, 4, 8] -> '0, 4, 8'; long lists shortened: '0, 4, 8, ... 396 (100 shards)'."""
    if len(indices) <= 12:
        return ", ".join(map(str, indices))
    return ", ".join(map(str, indices[:3])) + f", ... {indices[-1]} ({len(indices)} shards)"


def _shard_records(infos: list, segments: list) -> int:
    """About how many records a shard holds (for a task's progress bar): its share of each input."""
    return sum(infos[i].records * (b - a) // max(infos[i].units, 1) for i, a, b in segments)


def _write_rejects(out_dir: str, num_shards: int, inputs: list[dict]) -> None:
    """rejects.jsonl: the truncated inputs first, then every shard's rejects in shard order."""
    final = os.path.join(out_dir, REJECTS)
    with open(final + ".tmp", "wb") as out:
        for i in inputs:
            if i.get("truncated"):
                t = i["truncated"]
                entry = {"source": i["path"], "line": t["complete_lines"] + 1, "key": None, "reason": TRUNCATED_INPUT,
                         "detail": truncation_report(i), "excerpt": "", "shard": None, **t}
                out.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        for k in range(num_shards):
            with open(os.path.join(out_dir, STATE_DIR, f"rejects_{k:05d}.jsonl"), "rb") as f:
                while chunk := f.read(1 << 20):
                    out.write(chunk)
        fsync_close(out)
    os.replace(final + ".tmp", final)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_encode(opts: EncodeOptions) -> tuple[dict, int]:
    """Run (or resume) an encode; returns (manifest, exit status). Raises PrepError on bad arguments."""
    if not opts.text_keys:
        raise PrepError("at least one --text-key is needed")
    if len(set(opts.text_keys)) != len(opts.text_keys):
        raise PrepError("--text-key values must differ")
    if opts.piece_chars < 1000:
        raise PrepError("--piece-chars must be at least 1000")
    if opts.index_writer not in ("native", "megatron"):
        raise PrepError("--index-writer must be native or megatron")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", opts.name):
        raise PrepError(f"--name {opts.name!r}: use letters, digits, '_', '.', '-'")
    if opts.max_line_bytes < 0:
        raise PrepError(f"--max-line-bytes {opts.max_line_bytes}: must be positive (0: the default)")
    # checks that must fail before any work: inputs exist, tokenizer loads, output is writable
    specs = resolve_inputs(opts.inputs, opts.hf_split, opts.hf_cache_dir)
    tok = tokenizer_info(opts.tokenizer, opts.eod_piece)
    out_dir = ensure_writable_dir(opts.out_dir)
    os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)

    t0 = time.time()
    if opts.task is not None and opts.overwrite:
        raise PrepError("--overwrite cannot be used by a task (--num-tasks > 1): the tasks share the output "
                        "directory; empty it, or replace the old encode with a one-machine encode --overwrite")
    plain_dir = _fresh_decompressed_dir(out_dir, opts.task)
    # workers start (spawn, imports, tokenizer load) while the parent checksums and measures the inputs
    pool = WorkerPool(max(1, opts.workers or available_cores()), tok.path, tok.eod_piece)
    try:
        return _run_encode(opts, specs, tok, out_dir, pool, plain_dir, t0)
    finally:
        pool.close()
        shutil.rmtree(plain_dir, ignore_errors=True)


def _fresh_decompressed_dir(out_dir: str, task: Optional[Task] = None) -> str:
    """An empty directory in out_dir for this run's decompressed copies of compressed inputs (each is
    decompressed once, by the scan; shards seek into the copy). A killed run's copies are removed first:
    every run rebuilds its own. A task has copies of its own and removes only its own."""
    prefix = DECOMPRESSED_DIR_PREFIX + (f"task{task.index:05d}-" if task is not None else "")
    for entry in os.listdir(out_dir):
        if entry.startswith(prefix):
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)
    return tempfile.mkdtemp(prefix=prefix, dir=out_dir)


class WorkerPool:
    """A spawn-context process pool whose workers report progress through a queue."""

    def __init__(self, workers: int, tokenizer_path: str, eod_piece: str):
        ctx = mp.get_context("spawn")
        self.workers = workers
        self.queue = ctx.Queue()
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(self.queue, tokenizer_path, eod_piece))
        for _ in range(workers):
            self.executor.submit(_noop)

    def close(self, cancel: bool = False) -> None:
        self.executor.shutdown(wait=not cancel, cancel_futures=cancel)


def _run_encode(opts: EncodeOptions, specs, tok, out_dir: str, pool: WorkerPool, plain_dir: str,
                t0: float) -> tuple[dict, int]:
    before = decompressed_bytes()
    infos = [scan_input(s, os.path.join(plain_dir, f"input_{i:05d}.jsonl")) for i, s in enumerate(specs)]
    decompressed = decompressed_bytes() - before
    max_line_bytes = opts.max_line_bytes or DEFAULT_MAX_LINE_BYTES
    units = [i.units for i in infos]
    total_units = sum(units)
    num_shards = opts.num_shards or auto_num_shards(total_units)
    keys = list(opts.text_keys)
    settings = {
        "format": FORMAT_VERSION,
        "name": opts.name,
        "text_keys": keys,
        "num_shards": num_shards,
        "max_doc_chars": opts.max_doc_chars,
        "piece_chars": opts.piece_chars,
        "max_line_bytes": max_line_bytes,
        "hf_split": opts.hf_split,
        "eod_id": tok.eod_id,
        "dtype": tok.dtype_name,
    }
    inputs = [i.describe() for i in infos]
    tokenizer = tok.describe()
    fingerprint = _fingerprint(settings, inputs, tokenizer)
    base = {"tool": "fpa-prep encode", "fingerprint": fingerprint, "settings": settings,
            "inputs": inputs, "tokenizer": tokenizer}

    task = opts.task
    if task is not None and task.count > num_shards:
        raise PrepError(f"{task.count} tasks but only {num_shards} shard(s) planned: pass --num-shards "
                        f"{task.count} or more (every task must get a shard)")
    own = task.shards(num_shards) if task is not None else list(range(num_shards))
    manifest_path = os.path.join(out_dir, MANIFEST)
    record_path = manifest_path if task is None else os.path.join(out_dir, task.part_name)
    old = _load_json(manifest_path)
    if old is not None and old.get("fingerprint") != fingerprint:
        if task is not None or not opts.overwrite:
            raise PrepError(
                f"{out_dir} holds an encode with other settings ({_diff(old, base)}); "
                + ("pass --overwrite to replace it or choose another --out-dir" if task is None else
                   "choose another --out-dir, or empty it (the tasks must run the same command)"))
        _log(f"--overwrite: removing the previous encode in {out_dir}")
        _remove_previous(out_dir, old)
    if task is not None:
        old_part = _load_json(record_path)
        if old_part is not None and old_part.get("fingerprint") != fingerprint:
            raise PrepError(f"{record_path} is from an encode with other settings ({_diff(old_part, base)}): "
                            "the tasks must run the same command; choose another --out-dir, or empty it")
    _clean_temps(out_dir, None if task is None else _task_temp_prefixes(task, own, opts.name, keys))

    plan = plan_shards(units, num_shards)
    states = {}
    for k in own:
        s = _shard_done(out_dir, k, fingerprint)
        if s is not None:
            states[k] = s
    pending = [k for k in own if k not in states]

    def write_record(states: dict) -> None:
        """manifest.json, or this task's manifest part, for the shards done so far."""
        record = (_manifest(base, states, num_shards, keys) if task is None
                  else task_part(base, task, own, states))
        atomic_write_json(record_path, record)

    write_record(states)
    workers = max(1, min(pool.workers, len(pending) or 1))
    total_records = sum(i.records for i in infos)
    if task is not None:
        _log(f"encode: task {task.index} of {task.count} (from {task.source}): shards {_ranges(own)} "
             f"of {num_shards}")
    _log(
        f"encode: {len(infos)} input(s), {total_records:,} records, {num_shards} shard(s), "
        f"{len(states)} already done, {len(pending)} to do, {workers} worker(s); tokenizer vocab "
        f"{tok.vocab_size} -> {tok.dtype_name}, EOD {tok.eod_piece!r}={tok.eod_id}"
    )
    if states:
        _log(f"resuming: skipping shards {sorted(states)}")

    t_work = time.time()
    new_tokens = 0
    if pending:
        jobs = []
        for k in pending:
            jobs.append({
                "index": k,
                "segments": [(infos[i].to_dict(), a, b) for i, a, b in plan[k]],
                "keys": keys,
                "tokenizer": tok.path,
                "eod_piece": tok.eod_piece,
                "eod_id": tok.eod_id,
                "dtype": tok.dtype_name,
                "piece_chars": opts.piece_chars,
                "max_doc_chars": opts.max_doc_chars,
                "max_line_bytes": max_line_bytes,
                "out_dir": out_dir,
                "prefixes": {key: shard_prefix_name(opts.name, keys, key, k) for key in keys},
                "index_writer": opts.index_writer,
                "fingerprint": fingerprint,
            })
        own_records = None if task is None else sum(_shard_records(infos, plan[k]) for k in own)
        new_tokens, worker_decompressed = _run_pool(
            jobs, pool, opts.progress, states, write_record,
            done_records=sum(s["records"] for s in states.values()), total_records=own_records or total_records)
        decompressed += worker_decompressed
    elapsed_work = time.time() - t_work

    if task is None:
        _write_rejects(out_dir, num_shards, inputs)
        manifest = _manifest(base, states, num_shards, keys)
        atomic_write_json(manifest_path, manifest)
        _summary(manifest, out_dir, new_tokens, decompressed, elapsed_work, time.time() - t0)
    else:
        write_record(states)
        # the task's figures in the one-machine summary's form: a manifest of its own shards
        manifest = _manifest(base, states, num_shards, keys)
        manifest["status"] = "complete" if len(states) == len(own) else "incomplete"
        _summary(manifest, out_dir, new_tokens, decompressed, elapsed_work, time.time() - t0,
                 title=f"encode task {task.index} of {task.count} {manifest['status']} ({len(states)} of its "
                       f"{len(own)} shard(s)); `fpa-prep merge {out_dir}` once every task is done",
                 record_path=record_path)
    status = 0
    if opts.strict and manifest["rejects"]["total"]:
        _log(f"--strict: {manifest['rejects']['total']} reject(s): exit status {EXIT_STRICT_REJECTS}")
        status = EXIT_STRICT_REJECTS
    return manifest, status


def _run_pool(jobs, pool, progress, states, write_record, done_records, total_records) -> tuple[int, int]:
    """Run shard jobs on the pool, aggregate worker progress into one tqdm bar, write_record(states) after
    each shard; returns the new tokens and the bytes the workers decompressed."""
    from tqdm import tqdm

    progress_queue = pool.queue
    executor = pool.executor
    bar = tqdm(total=total_records, initial=done_records, unit="doc", unit_scale=True, disable=not progress,
               file=sys.stderr, mininterval=0.5, dynamic_ncols=True, desc="encode")
    t0 = time.monotonic()
    tokens = 0  # progress reports (for the bar)
    new_tokens = 0  # committed shards (exact)
    decompressed = 0

    def drain():
        nonlocal tokens
        changed = False
        while True:
            try:
                _, n_records, n_tokens = progress_queue.get_nowait()
            except queue_mod.Empty:
                break
            bar.update(n_records)
            tokens += n_tokens
            changed = True
        if changed:
            rate = tokens / max(time.monotonic() - t0, 1e-9)
            bar.set_postfix_str(f"tokens={tokens:,} tok/s={rate:,.0f}", refresh=False)

    try:
        futures = {executor.submit(encode_shard, job): job["index"] for job in jobs}
        remaining = set(futures)
        while remaining:
            done, remaining = wait(remaining, timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            for fut in done:
                stats = fut.result()  # re-raises a worker's exception
                decompressed += stats.pop("decompressed_bytes")
                states[stats["index"]] = stats
                new_tokens += sum(stats["tokens"].values())
                write_record(states)
        drain()
    except BaseException:
        pool.close(cancel=True)
        bar.close()
        raise
    bar.close()
    return new_tokens, decompressed


def _summary(manifest: dict, out_dir: str, new_tokens: int, decompressed: int, work_s: float, total_s: float,
             title: str = "", record_path: str = "") -> None:
    lines = []
    for key, d in manifest["datasets"].items():
        span = f" {d['shards'][0]} .. {d['shards'][-1]}" if d["shards"] else ""
        lines.append(f"  key {key!r}: {d['documents']:,} documents, {d['tokens']:,} tokens "
                     f"in {len(d['shards'])} shard(s){span}")
        if d["empty_shards"]:
            lines.append(f"    shards without a document for this key (no files written): {d['empty_shards']}")
    rej = manifest["rejects"]
    if rej["total"]:
        reasons = ", ".join(f"{r} {n}" for r, n in rej["by_reason"].items())
        lines.append(f"  rejects: {rej['total']:,} ({reasons}) -> {os.path.join(out_dir, REJECTS)}")
    else:
        lines.append("  rejects: 0")
    for i in manifest["inputs"]:
        if i.get("truncated"):
            lines.append(f"  TRUNCATED INPUT: {truncation_report(i)}")
    compressed = [i for i in manifest["inputs"] if i.get("compression")]
    if compressed:
        lines.append(f"  compressed inputs: {len(compressed)} ({sum(i['uncompressed_bytes'] for i in compressed):,} "
                     f"bytes uncompressed); decompressed this run: {decompressed:,} bytes")
    ld = manifest["long_documents"]
    if ld["count"]:
        lines.append(f"  long documents encoded in pieces of <= {ld['piece_chars']:,} chars: {ld['count']} "
                     f"(longest {ld['longest_chars']:,} chars)")
    rate = new_tokens / work_s if work_s > 0 and new_tokens else 0.0
    lines.append(f"  time: {total_s:.1f} s total, {work_s:.1f} s encoding"
                 + (f", {rate:,.0f} tokens/s this run" if rate else ""))
    lines.append(f"  manifest: {record_path or os.path.join(out_dir, MANIFEST)}")
    print((title or f"encode {manifest['status']}: {out_dir}") + "\n" + "\n".join(lines), flush=True)
