"""The inference commands: `fpa-generate` (`generate_main`) and `fpa-eval` (`eval_main`).

Parsing the arguments (and `--help`) imports neither torch, Megatron nor transformers: each command imports
what it runs inside its main.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from data_prep.quiet import quiet_optional_dependency_warnings

GENERATE_HELP = '`fpa-generate --checkpoint DIR --prompt TEXT`: continue a prompt with a trained model, on CPU.'
EVAL_HELP = '`fpa-eval --checkpoint DIR (--data PREFIX|FILE.jsonl | --split valid|test|NAME | --tasks NAMES|YAML)`: LM loss and\nperplexity, or downstream tasks through lm-evaluation-harness (`--tasks`, see inference/harness.py).'


def generate_main(argv: Optional[list[str]] = None) -> int:
    """`fpa-generate`: continue a prompt with a trained or exported model."""
    quiet_optional_dependency_warnings()  # before anything imports megatron
    parser = argparse.ArgumentParser(prog="fpa-generate", description=GENERATE_HELP)
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint (iter_ dir, checkpoint root or run dir) or fpa-export hf output")
    parser.add_argument("--prompt", required=True, help="text to continue ('' starts a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy; > 0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample within top-p probability mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--tokenizer", default=None, help="the run's tokenizer (.model or tokenizer.json), if it moved")
    args = parser.parse_args(argv)

    from fpa_megatron.checkpoint.reader import CheckpointError
    from fpa_megatron.export.hf import ExportError, load_hf, quiet_transformers
    from fpa_megatron.inference.generate import generate, sampling_options

    quiet_transformers()
    try:
        sampling_options(args.temperature, args.top_k, args.top_p)
        loaded = load_hf(args.checkpoint, args.tokenizer)
        if loaded.tokenizer is None:
            raise ExportError(f"{args.checkpoint}: no tokenizer (a run on mock data?): cannot encode a prompt")
        result = generate(loaded.model, loaded.tokenizer, loaded.tokenizer_spec.eod_id, args.prompt,
                          args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    except (CheckpointError, ExportError, ValueError) as err:
        print(f"fpa-generate: {err}", file=sys.stderr)
        return 2
    print(args.prompt + result.text)
    mode = "greedy" if args.temperature == 0 else f"sampled (temperature {args.temperature}, seed {args.seed})"
    end = ("stopped at end of document" if result.stopped_at_eod
           else f"stopped after --max-new-tokens={args.max_new_tokens}")
    print(f"[{len(result.new_ids)} new tokens, {mode}, {end}]", file=sys.stderr)
    return 0


def eval_main(argv: Optional[list[str]] = None) -> int:
    """`fpa-eval`: loss and perplexity on data or the run's split, or lm-eval tasks."""
    quiet_optional_dependency_warnings()  # before anything imports megatron
    parser = argparse.ArgumentParser(prog="fpa-eval", description=EVAL_HELP)
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint (iter_ dir, checkpoint root or run dir) or fpa-export hf output")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="indexed dataset prefix (PREFIX.bin/.idx) or a .jsonl file of documents")
    source.add_argument("--split", metavar="valid|test|NAME",
                        help="the run's own data config: its validation or test split, or its validation set NAME "
                             "(data.validation)")
    source.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated: names (e.g. hellaswag,arc_easy; "
                                        "their data must be on this machine: no download) or task YAML files")
    parser.add_argument("--include-path", action="append", default=None, metavar="DIR",
                        help="--tasks: a directory of task YAMLs to add to lm-eval's (repeatable)")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="--tasks: few-shot examples (default: the task's)")
    parser.add_argument("--limit", type=float, default=None,
                        help="--tasks: first N documents per task (< 1: a fraction)")
    parser.add_argument("--output", default=None, help="--tasks: write the results as JSON to this file")
    parser.add_argument("--seed", type=int, default=1234, help="--tasks: seed of lm-eval's few-shot sampling")
    parser.add_argument("--batches", type=int, default=None, help="--split: global batches (default train.eval_iters)")
    parser.add_argument("--text-key", default="text", help=".jsonl: the field holding the text")
    parser.add_argument("--batch-size", type=int, default=8, help="--data: sequences per forward pass")
    parser.add_argument("--tokenizer", default=None, help="the run's tokenizer (.model or tokenizer.json), if it moved")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from fpa_megatron.checkpoint.reader import CheckpointError
    from fpa_megatron.config import ConfigError
    from fpa_megatron.export.hf import ExportError, quiet_transformers
    from fpa_megatron.inference.evaluate import evaluate

    quiet_transformers()
    if args.tasks is not None:
        return _eval_tasks(args)
    try:
        result = evaluate(args.checkpoint, args.data, args.split, args.batches, args.text_key, args.batch_size,
                          args.tokenizer, progress=not args.no_progress)
    except (CheckpointError, ConfigError, ExportError, FileNotFoundError, ValueError) as err:
        print(f"fpa-eval: {err}", file=sys.stderr)
        return 2
    print(f"{result.source}")
    print(f"loss {result.loss:.6f} | perplexity {result.perplexity:.3f} | {result.tokens:,} tokens")
    return 0


def _eval_tasks(args) -> int:
    """--tasks: lm-eval on the model; the table on stdout, the JSON in --output."""
    from fpa_megatron.checkpoint.reader import CheckpointError
    from fpa_megatron.config import ConfigError
    from fpa_megatron.export.hf import ExportError
    from fpa_megatron.inference.harness import results_table, run_tasks, write_results

    try:
        results = run_tasks(args.checkpoint, args.tasks, args.include_path, args.num_fewshot, args.limit,
                            args.batch_size, args.tokenizer, args.seed)
    except (CheckpointError, ConfigError, ExportError, FileNotFoundError, ImportError, ValueError) as err:
        print(f"fpa-eval: {err}", file=sys.stderr)
        return 2
    print(results_table(results))
    if args.output:
        write_results(results, args.output)
        print(f"results: {args.output}")
    return 0
