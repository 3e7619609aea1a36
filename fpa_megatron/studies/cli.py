"""`fpa-ablate STUDY [--quick] [--out DIR] [--seeds N] [--workers N]`: does FPA help? Rerunnable studies.

Studies: `lambda` (lambda_0 on the demo corpus), `lr-sweep` (stability over learning rates without warmup,
FPA off / on / QK-layernorm), `recall` (multi-query associative recall per key-to-query distance). Each
run is a real `fpa-train` process; finished runs are kept, so rerunning the same command resumes.
Writes `<out>/report.md` (tables: mean ± std over seeds, every run; plots under `<out>/plots/`) and
`<out>/report.json` (the same numbers). Exit status: 0 when every run finished, 1 if some failed (the
report still shows them), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fpa_megatron.quiet import quiet_optional_dependency_warnings
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
    parser.add_argument("--ranks", type=int, default=1, choices=[1, 2],
                        help="processes per run (2: data parallel under torchrun; default 1)")
    parser.add_argument("--data-dir", default="data/demo",
                        help="the demo corpus (lambda, lr-sweep): reused if present, else prepared as "
                             "scripts/demo.sh does (default data/demo)")
    parser.add_argument("--rerun-failed", action="store_true", help="run failed runs again (finished ones are kept)")
    return parser


def _check_study_dir(out: Path, record: dict) -> None:
    """One output directory holds one study at one scale: a rerun must not mix runs of another."""
    path = out / STUDY_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if (saved["study"], saved["scale"]) != (record["study"], record["scale"]):
            raise SystemExit(f"fpa-ablate: {out} holds the {saved['study']} study at scale {saved['scale']!r}; "
                             f"use another --out for {record['study']} at scale {record['scale']!r}")
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
    out = Path(args.out or f"runs/ablate/{args.study}{'' if scale == 'default' else '-' + scale}").resolve()
    study = STUDIES[args.study](scale=scale, out=out, data_dir=Path(args.data_dir))
    seeds = args.seeds or study.default_seeds
    _check_study_dir(out, {"study": args.study, "scale": scale})

    from fpa_megatron.config import ConfigError
    from fpa_megatron.studies.runner import StudyRunner

    specs = study.runs(seeds)
    try:
        config_path = _write_base_config(study, specs, args.ranks)
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


def _write_base_config(study, specs, ranks: int) -> Path:
    """The study's base config as `<out>/base.yaml`, after checking it with every arm's overrides (before
    anything runs). With 2 ranks per run the global batch stays the same (micro-batches are cut)."""
    from fpa_megatron.config import config_from_dict, config_to_dict, save_config
    from fpa_megatron.config_checks import check_config

    base = config_from_dict(study.base_config())
    train = base.train
    if ranks > 1 and train.global_batch_size % (train.micro_batch_size * ranks):
        train.micro_batch_size = train.global_batch_size // ranks
    for spec in specs:
        check_config(config_from_dict(config_to_dict(base), list(spec.overrides)), ranks)
    path = study.out / "base.yaml"
    save_config(base, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
