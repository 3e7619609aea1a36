"""`fpa-prep`: corpus | tokenizer | encode | merge | inspect | synthetic (one command per data-preparation step).

Exit status: 0 success, 2 usage or input error (reported before any work when possible), 3 rejects
under --strict, 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_prep.common import PrepError
from data_prep.quiet import quiet_optional_dependency_warnings


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", action="append", required=True, metavar="PATH",
                   help="a .jsonl/.json/.ndjson file (optionally .gz or .zst), a .parquet file, a glob, a "
                        "directory written by datasets' save_to_disk, a directory of such files, or "
                        "hf:<builder>:<files> for datasets.load_dataset on local files (e.g. hf:csv:data/*.csv). "
                        "Repeatable; inputs are read in the order given.")
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset input (default: train)")
    p.add_argument("--hf-cache-dir", default=None,
                   help="cache directory for hf:<builder>:<files> inputs (default: the datasets library's own)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpa-prep", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", help="write the built-in demo corpus (Python standard library source and docstrings)")
    p.add_argument("--out", required=True, help="output directory (gets <name>.jsonl and <name>.json)")
    p.add_argument("--max-mb", type=float, default=8.0, help="size budget in MiB of text (default 8)")
    p.add_argument("--name", default="stdlib")

    p = sub.add_parser("tokenizer", help="train a sentencepiece (default) or byte-level BPE tokenizer on a seeded "
                                         "sample of the corpus")
    _add_input_args(p)
    p.add_argument("--type", choices=TOKENIZER_TYPES, default="sentencepiece",
                   help="sentencepiece (default: <out>.model) or bpe-bytelevel (a Hugging Face tokenizer.json, GPT-2's "
                        "byte-level scheme, trained with the tokenizers library)")
    p.add_argument("--out", required=True, help="sentencepiece: output prefix, writes <out>.model, <out>.vocab, "
                                                "<out>.json; bpe-bytelevel: output directory, writes tokenizer.json, "
                                                "tokenizer_config.json, settings.json")
    p.add_argument("--text-key", default="text", help="JSON field / column holding the text (default: text)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece model type")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="encode characters outside the vocabulary as UTF-8 bytes (default: on)")
    p.add_argument("--sample-size", type=int, default=300_000, help="lines sampled from the corpus (default 300000)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234)")
    p.add_argument("--eod-piece", default=None,
                   help="the end-of-document piece: the tokenizer's eos (default </s>; bpe-bytelevel <|endoftext|>)")
    p.add_argument("--special-tokens", default="", help="bpe-bytelevel: comma-separated special tokens after EOD")
    p.add_argument("--user-defined-symbols", default="", help="comma-separated pieces always kept whole")
    p.add_argument("--control-symbols", default="", help="comma-separated special tokens never produced from text")
    p.add_argument("--normalization", default="identity", choices=["identity", "nfkc", "nmt_nfkc", "nfkc_cf"],
                   help="sentencepiece normalization rule (default identity: text round-trips exactly)")
    p.add_argument("--add-dummy-prefix", action="store_true", help="prepend a space to each text (sentencepiece's default)")
    p.add_argument("--no-split-digits", dest="split_digits", action="store_false")
    p.add_argument("--threads", type=int, default=0, help="training threads (default: every core)")

    p = sub.add_parser("encode", help="tokenize inputs into Megatron .bin/.idx shards (resumable)")
    _add_input_args(p)
    p.add_argument("--tokenizer", required=True,
                   help="sentencepiece .model, Hugging Face tokenizer.json, or a directory holding a tokenizer.json")
    p.add_argument("--out-dir", required=True, help="output directory (one encode per directory)")
    p.add_argument("--name", default="data", help="shard file prefix: <name>_<NNNNN>.bin/.idx (default: data)")
    p.add_argument("--text-key", action="append", dest="text_keys", metavar="KEY",
                   help="field / column with the text (default: text); repeat for several keys, each "
                        "becoming its own dataset <name>_<key>_<NNNNN>")
    p.add_argument("--num-shards", type=int, default=0,
                   help="number of shards (default: from the input size, ~64 MiB each, at least min(16, MiB))")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: every core)")
    p.add_argument("--max-doc-chars", type=int, default=0,
                   help="reject documents longer than this many characters (default 0: no limit)")
    p.add_argument("--piece-chars", type=int, default=1_000_000,
                   help="documents longer than this are tokenized in pieces of at most this many characters "
                        "(bounded memory) and stored whole (default 1000000)")
    p.add_argument("--eod-piece", default=None,
                   help="end-of-document piece (default: the tokenizer's eos; for a tokenizer.json the eos_token of "
                        "the tokenizer_config.json next to it, else <|endoftext|> or </s> if it has one)")
    p.add_argument("--max-line-bytes", type=int, default=0,
                   help="reject a JSON line longer than this many bytes, reading past it in bounded memory "
                        "(default 0: 256 MiB)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 3 if anything was rejected (a truncated .gz/.zst input included)")
    p.add_argument("--overwrite", action="store_true", help="replace an encode with other settings in --out-dir")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--index-writer", choices=["native", "megatron"], default="native",
                   help="native (numpy, fast worker start) or megatron (IndexedDatasetBuilder); same bytes")
    p.add_argument("--task-index", type=int, default=None,
                   help="encode only this task's shards (0-based; default: FPA_PREP_TASK_INDEX, else "
                        "SLURM_ARRAY_TASK_ID), writing manifest.task-<I>-of-<N>.json; then `fpa-prep merge`")
    p.add_argument("--num-tasks", type=int, default=None,
                   help="how many tasks share the encode, each on its own machine (default: FPA_PREP_NUM_TASKS, "
                        "else SLURM_ARRAY_TASK_COUNT; none: one machine does every shard)")

    p = sub.add_parser("merge", help="merge shards into one dataset prefix (a file copy; no Megatron import)")
    p.add_argument("sources", nargs="+",
                   help="an encode output directory (merges its shards per text key) or dataset prefixes in order")
    p.add_argument("--output-prefix", "-o", default=None,
                   help="merged prefix (default for a directory: <dir>/<name> or <dir>/<name>_<key>)")
    p.add_argument("--key", action="append", dest="keys", help="only these text keys (directory source)")

    p = sub.add_parser("synthetic", help="write a seeded synthetic task as an indexed dataset (mqar: associative recall)")
    p.add_argument("task", choices=["mqar"], help="mqar: multi-query associative recall (Zoology, Arora et al. 2023)")
    p.add_argument("--out-dir", required=True, help="output directory (gets <name>.bin/.idx and <name>.json)")
    p.add_argument("--name", default="mqar", help="dataset prefix name (default: mqar)")
    p.add_argument("--num-sequences", type=int, required=True, help="sequences (= documents) to write")
    p.add_argument("--seq-length", type=int, default=64, help="tokens per sequence; train with model.seq_length equal")
    p.add_argument("--num-pairs", type=int, default=4, help="key-value pairs (and queries) per sequence (default 4)")
    p.add_argument("--vocab-size", type=int, default=256, help="keys and values in halves, EOD = the last id (default 256)")
    p.add_argument("--min-distance", type=int, default=1, help="smallest key-to-query distance (default: any)")
    p.add_argument("--max-distance", type=int, default=1_000_000, help="largest key-to-query distance (default: any)")
    p.add_argument("--seed", type=int, default=1234)

    p = sub.add_parser("inspect", help="print counts and decode the first tokens of a few documents")
    p.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model or tokenizer.json (default: from the encode manifest)")
    p.add_argument("--docs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48)
    return parser


TOKENIZER_TYPES = ("sentencepiece", "bpe-bytelevel")


def _csv(value: str) -> tuple:
    return tuple(v for v in value.split(",") if v)


def run(args: argparse.Namespace) -> int:
    if args.command == "corpus":
        from data_prep.builtin_corpus import write_corpus

        info = write_corpus(args.out, args.max_mb, args.name)
        print(json.dumps(info, indent=2))
        return 0

    if args.command == "tokenizer":
        from data_prep.readers import iter_texts, resolve_inputs, scan_input, truncation_report
        from data_prep.tokenizer import train_tokenizer

        specs = resolve_inputs(args.input, args.hf_split, args.hf_cache_dir)
        infos = [scan_input(s) for s in specs]
        for info in infos:
            if info.truncated:
                print(f"fpa-prep tokenizer: warning: {truncation_report(info.describe())}", file=sys.stderr)
        rejected = 0

        def texts():
            nonlocal rejected
            for _, _, text, reason in iter_texts(infos, args.text_key):
                if text is None:
                    rejected += 1
                else:
                    yield text

        inputs = {"inputs": [i.describe() for i in infos], "text_key": args.text_key}
        if args.type == "bpe-bytelevel":
            from data_prep.tokenizer import BYTELEVEL_EOD, train_bytelevel_bpe

            settings = train_bytelevel_bpe(
                texts(), args.out, vocab_size=args.vocab_size, sample_size=args.sample_size, seed=args.seed,
                eod_piece=args.eod_piece or BYTELEVEL_EOD, special_tokens=_csv(args.special_tokens),
                extra_settings=inputs)
            print(f"tokenizer: {args.out}/tokenizer.json (vocab {settings['vocab_size']}, byte-level BPE, "
                  f"EOD {settings['eod']['piece']!r}={settings['eod']['id']}); sampled "
                  f"{settings['sample']['lines_sampled']:,} of {settings['sample']['lines_seen']:,} lines from "
                  f"{settings['sample']['documents_seen']:,} documents ({rejected} unusable records skipped) "
                  f"in {settings['seconds']['total']:.1f} s; settings: {args.out}/settings.json")
            return 0
        settings = train_tokenizer(
            texts(), args.out, vocab_size=args.vocab_size, model_type=args.model_type,
            character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
            sample_size=args.sample_size, seed=args.seed, user_defined_symbols=_csv(args.user_defined_symbols),
            control_symbols=_csv(args.control_symbols), eod_piece=args.eod_piece or "</s>",
            normalization=args.normalization,
            add_dummy_prefix=args.add_dummy_prefix, split_digits=args.split_digits, num_threads=args.threads or None,
            extra_settings=inputs,
        )
        settings["sample"]["records_skipped"] = rejected
        print(f"tokenizer: {args.out}.model (vocab {settings['vocab_size']}, {settings['model_type']}, "
              f"EOD {settings['eod']['piece']!r}={settings['eod']['id']}); sampled "
              f"{settings['sample']['lines_sampled']:,} of {settings['sample']['lines_seen']:,} lines from "
              f"{settings['sample']['documents_seen']:,} documents ({rejected} unusable records skipped) "
              f"in {settings['seconds']['total']:.1f} s; settings: {args.out}.json")
        return 0

    if args.command == "encode":
        from data_prep.encode import EncodeOptions, run_encode
        from data_prep.tasks import resolve_task

        opts = EncodeOptions(
            inputs=args.input, tokenizer=args.tokenizer, out_dir=args.out_dir, name=args.name,
            text_keys=args.text_keys or ["text"], num_shards=args.num_shards, workers=args.workers,
            max_doc_chars=args.max_doc_chars, piece_chars=args.piece_chars, max_line_bytes=args.max_line_bytes,
            strict=args.strict,
            overwrite=args.overwrite, progress=args.progress, index_writer=args.index_writer,
            hf_split=args.hf_split, hf_cache_dir=args.hf_cache_dir, eod_piece=args.eod_piece,
            task=resolve_task(args.task_index, args.num_tasks),
        )
        _, status = run_encode(opts)
        return status

    if args.command == "merge":
        import os

        from data_prep.merge import describe_merge, merge_encode_dir, merge_prefixes

        if len(args.sources) == 1 and os.path.isdir(args.sources[0]):
            results = merge_encode_dir(args.sources[0], args.keys, args.output_prefix)
        else:
            if not args.output_prefix:
                raise PrepError("merging prefixes needs --output-prefix")
            results = [merge_prefixes(args.sources, args.output_prefix)]
        for r in results:
            print(describe_merge(r))
        return 0

    if args.command == "synthetic":
        from data_prep.synthetic import MQARSpec, write_mqar

        spec = MQARSpec(args.seq_length, args.num_pairs, args.vocab_size, args.min_distance, args.max_distance)
        info = write_mqar(args.out_dir, args.name, spec, args.num_sequences, args.seed)
        print(f"mqar: {info['num_sequences']:,} sequences of {args.seq_length} tokens, {args.num_pairs} pairs, "
              f"vocab {args.vocab_size}, distances {info['distance_range'][0]} .. {info['distance_range'][1]} "
              f"-> {info['prefix']}.bin/.idx (train with model.vocab_size={args.vocab_size} data.eod_mask_loss=true)")
        return 0

    if args.command == "inspect":
        from data_prep.inspect_prefix import inspect_prefix

        print(inspect_prefix(args.prefix, args.tokenizer, args.docs, args.tokens))
        return 0
    raise AssertionError(args.command)


def main(argv=None) -> int:
    quiet_optional_dependency_warnings()  # `inspect` and --index-writer megatron import megatron.core
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PrepError as err:
        print(f"fpa-prep {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fpa-prep {args.command}: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
