"""`fpa-ablate STUDY [--quick] [--out DIR] [--seeds N] [--workers N] [--ranks N] [--set KEY=VALUE]`: does FPA
help? Rerunnable studies.

Studies: `lambda` (lambda_0 on the demo corpus), `lr-sweep` (stability over learning rates without warmup,
FPA off / on / QK-layernorm), `recall` (multi-query associative recall per key-to-query distance). Each
run is a real `fpa-train` process; finished runs are kept, so rerunning the same command resumes.
Writes `<out>/report.md` (tables: mean ± std over seeds, every run; plots under `<out>/plots/`) and
`<out>/report.json` (the same numbers). Exit status: 0 when every run finished, 1 if some failed (the
report still shows them), 2 for bad arguments. `recall` also takes `--seq-length` and `--buckets`: with
`--set parallel.context=2 --ranks 2` it runs where keys are thousands of tokens before their queries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_prep.quiet import quiet_optional_dependency_warnings
from fpa_megatron.studies.studies import SCALES, STUDIES, failed_runs, log_hint

STUDY_FILE = "study.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpa-ablate", description="Does FPA help? Run a study's arms as real fpa-train runs (same data, steps "
        "and seeds; several seeds per arm), resumably, and write <out>/report.md with tables and plots.")
    parser.add_argument("study", choices=sorted(STUDIES), help="which study to run")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a couple of minutes (fewer steps and arms)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' scale
    parser.add_argument("--out", default=None, help="output directory (default: runs/ablate/<study>[-quick])")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the study's, 2 or 3)")
    parser.add_argument("--workers", type=int, default=2, help="runs at the same time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    parser.add_argument("--ranks", type=int, default=1, choices=[1, 2, 4],
                        help="processes per run (under torchrun: data parallel, or the layout --set gives; default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a config override for every run, e.g. parallel.context=2 (with --ranks 2) to split "
                             "long sequences over 2 processes; repeatable")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="recall: MQAR sequence length (default 64); thousands of tokens put the keys that far "
                             "from their queries")
    parser.add_argument("--buckets", nargs="+", default=None, metavar="LO-HI",
                        help="recall: key-to-query distance buckets (default: 4 equal parts of the distances the "
                             "sequence length allows)")
    parser.add_argument("--data-dir", default="data/demo",
                        help="the demo corpus (lambda, lr-sweep): reused if present, else prepared as "
                             "scripts/demo.sh does (default data/demo)")
    parser.add_argument("--rerun-failed", action="store_true", help="run failed runs again (finished ones are kept)")
    return parser


def _describe(record: dict) -> str:
    length = f" and sequence length {record['seq_length']}" if record.get("seq_length") else ""
    return f"{record['study']} study at scale {record['scale']!r}{length}"


def _check_study_dir(out: Path, record: dict) -> None:
    """One output directory holds one study at one scale: a rerun must not mix runs of another."""
    path = out / STUDY_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if (saved["study"], saved["scale"], saved.get("seq_length")) != (
                record["study"], record["scale"], record.get("seq_length")):
            raise SystemExit(f"fpa-ablate: {out} holds the {_describe(saved)}; use another --out for the "
                             f"{_describe(record)}")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    quiet_optional_dependency_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    scale = "tiny" if args.tiny else "quick" if args.quick else "default"
    assert scale in SCALES
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds={args.seeds} must be >= 1")
    if args.workers < 1 or args.threads < 1:
        parser.error(f"--workers={args.workers} and --threads={args.threads} must be >= 1")
    if args.study != "recall" and (args.seq_length is not None or args.buckets is not None):
        parser.error("--seq-length and --buckets belong to the recall study")
    buckets = _parse_buckets(parser, args.buckets)
    if args.seq_length is not None and args.seq_length < 1:
        parser.error(f"--seq-length={args.seq_length} must be >= 1")
    out = Path(args.out or f"runs/ablate/{args.study}{'' if scale == 'default' else '-' + scale}").resolve()
    study = STUDIES[args.study](scale=scale, out=out, data_dir=Path(args.data_dir), seq_length=args.seq_length,
                                buckets=buckets)
    seeds = args.seeds or study.default_seeds
    record = {"study": args.study, "scale": scale}
    if args.seq_length is not None:  # the data of one directory is made at one length
        record["seq_length"] = args.seq_length
    _check_study_dir(out, record)

    from fpa_megatron.config import ConfigError
    from fpa_megatron.studies.runner import StudyRunner

    specs = study.runs(seeds)
    try:
        config_path = _write_base_config(study, specs, args.ranks, args.overrides)
    except ConfigError as err:
        print(f"fpa-ablate: config error: {err}", file=sys.stderr)
        return 2
    runner = StudyRunner(out, config_path, workers=args.workers, threads=args.threads, ranks=args.ranks,
                         rerun_failed=args.rerun_failed)
    done = runner.run_all(specs)
    evaluated = True
    try:
        study.after_training(specs, done)
    except RuntimeError as err:  # e.g. the recall evaluation failed: the report still shows the training runs
        print(f"fpa-ablate: {err}", file=sys.stderr)
        evaluated = False
    text, numbers = study.report(specs, done)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"study": args.study, "scale": scale, "seeds": seeds, **numbers},
                                                indent=2, default=str) + "\n")
    print(f"report: {out / 'report.md'} (plots in {out / 'plots'})")
    failed = failed_runs(done)
    for name in failed:
        print(f"fpa-ablate: run {name} failed: see {log_hint(out, name)}", file=sys.stderr)
    return 1 if not evaluated or (failed and args.study != "lr-sweep") else 0  # lr-sweep: failed = diverged


def _parse_buckets(parser, items):
    """['4-15', '16-29'] -> ((4, 15), (16, 29)), or None."""
    if items is None:
        return None
    buckets = []
    for item in items:
        try:
            lo, hi = (int(x) for x in item.split("-"))
        except ValueError:
            parser.error(f"--buckets {item!r}: expected LO-HI (two integers)")
        if not 1 <= lo <= hi:
            parser.error(f"--buckets {item!r}: need 1 <= LO <= HI")
        buckets.append((lo, hi))
    return tuple(buckets)


def _write_base_config(study, specs, ranks: int, overrides: list[str] = ()) -> Path:
    """The study's base config with the --set overrides as `<out>/base.yaml`, after checking it with every
    arm's overrides (before anything runs). With more ranks per run the global batch stays the same (with
    data parallelism, micro-batches are cut)."""
    from fpa_megatron.config import config_from_dict, config_to_dict, save_config
    from fpa_megatron.preflight import check_config

    base = config_from_dict(study.base_config(), list(overrides))
    train, p = base.train, base.parallel
    data_parallel = max(1, ranks // (p.tensor * p.context * p.pipeline))
    if data_parallel > 1 and train.global_batch_size % (train.micro_batch_size * data_parallel):
        train.micro_batch_size = train.global_batch_size // data_parallel
    for spec in specs:
        check_config(config_from_dict(config_to_dict(base), list(spec.overrides)), ranks)
    path = study.out / "base.yaml"
    save_config(base, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
