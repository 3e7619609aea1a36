"""fpa-prep: raw text -> sentencepiece tokenizer -> Megatron-core indexed datasets (.bin/.idx).

Subcommands live in `data_prep.cli`; each step has its own module (readers, tokenizer, encode, merge,
inspect_prefix, builtin_corpus). Importing this package is cheap on purpose: encode workers are spawned
processes and must not pay for torch or Megatron imports.
"""

__version__ = "0.1.0"
