"""`fpa-eval --tasks NAMES|YAML`: downstream tasks through EleutherAI's lm-evaluation-harness, offline.

The model is the transformers model `fpa-export hf` writes (an exported directory, or a training checkpoint
converted in memory by the same code), wrapped in a small `lm_eval.api.model.TemplateLM`: the harness's own
request handling (context / continuation split, empty contexts prefixed with EOD), scored here in float32 over the
real vocabulary (the export drops the padding rows). Why not lm-eval's `HFLM`: it needs `accelerate` (and `peft`)
at import and would have to be fed an exported directory; this class is ~100 lines over the model and tokenizer we
already load, and scores a checkpoint and its export identically.

Offline: HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set before lm-eval (and `datasets`) import, so a task whose
data is not on this machine fails instead of downloading. Local tasks: a task YAML (any directory, or
`--include-path DIR`), e.g. `dataset_path: json` with `dataset_kwargs: {data_files: ...}`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from fpa_megatron.export.hf import load_hf

INSTALL_HINT = "pip install -e .[eval]  (or: pip install 'lm-eval>=0.4.13,<0.5')"


def require_lm_eval():
    """lm-eval, imported offline, or an ImportError saying how to install it."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import lm_eval
    except ImportError:
        raise ImportError(f"--tasks needs the optional dependency lm-eval: {INSTALL_HINT}") from None
    return lm_eval


def harness_lm(model, tokenizer, eod_id: int, max_length: int, batch_size: int = 8):
    """An lm-eval model over a transformers causal LM and its tokenizer (defined here: lm-eval is optional)."""
    require_lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class HarnessLM(TemplateLM):
        """lm-eval requests scored by one transformers model: log-likelihoods in float32, greedy generation."""

        def __init__(self):
            super().__init__()
            self.model, self.tokenizer, self.eod, self.max_length = model, tokenizer, eod_id, max_length

        @property
        def eot_token_id(self) -> int:
            return self.eod

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.tokenizer.encode(string, add_special_tokens=False, verbose=False)

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            """(sum of log p(continuation | context), whether greedy decoding produces it) per request; the input
            is cut from the left to max_length tokens, as lm-eval's own HF model does."""
            out = [None] * len(requests)
            rows = []
            for i, (_, context, continuation) in enumerate(requests):
                ids = (context + continuation)[-(self.max_length + 1):][:-1]
                rows.append((i, ids, continuation))
            rows.sort(key=lambda r: -len(r[1]))  # similar lengths together: little padding
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                width = len(batch[0][1])
                tokens = torch.full((len(batch), width), self.eod, dtype=torch.long)
                for j, (_, ids, _) in enumerate(batch):
                    tokens[j, :len(ids)] = torch.tensor(ids)  # right padding: causal, so no effect on the rest
                logprobs = torch.log_softmax(self.model(tokens).logits.float(), dim=-1)  # the real vocabulary
                for j, (i, ids, continuation) in enumerate(batch):
                    n = len(continuation)
                    rows_lp = logprobs[j, len(ids) - n:len(ids)]
                    target = torch.tensor(continuation)
                    out[i] = (float(rows_lp.gather(1, target[:, None]).sum()),
                              bool((rows_lp.argmax(dim=-1) == target).all()))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Log-likelihood of whole texts, in disjoint max_length windows (lm-eval's rolling scheme)."""
            scores = []
            for (text,) in [r.args for r in requests]:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    self.tok_encode(text), prefix_token=self.eod, max_seq_len=self.max_length, context_len=1)]
                results = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
                scores.append(sum(r[0] for r in results))
            return scores

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy continuations, cut at the first of the request's `until` strings."""
            texts = []
            for context, options in [r.args for r in requests]:
                until = options.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(options.get("max_gen_toks", 256))
                ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eod]
                prompt = torch.tensor([ids])
                new = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new,
                                          do_sample=False, eos_token_id=self.eod, pad_token_id=self.eod)
                text = self.tokenizer.decode(new[0, len(ids):].tolist(), skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0]
                texts.append(text)
            return texts

    return HarnessLM()


def task_list(tasks: str) -> tuple[list[str], list[str]]:
    """`--tasks a,b,path/to/task.yaml` -> (task names, directories to include); a YAML file names its task."""
    import yaml

    names, include = [], []
    for item in (t.strip() for t in tasks.split(",")):
        if not item:
            continue
        if item.endswith((".yaml", ".yml")):
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"--tasks {item}: no such task file")
            config = yaml.safe_load(path.read_text()) or {}
            name = config.get("task") or config.get("group")
            if not isinstance(name, str):
                raise ValueError(f"--tasks {item}: the YAML has no 'task' name")
            names.append(name)
            include.append(str(path.parent.resolve()))
        else:
            names.append(item)
    if not names:
        raise ValueError("--tasks: no task named")
    return names, include


def run_tasks(checkpoint: str, tasks: str, include_path: Optional[list[str]] = None, num_fewshot: Optional[int] = None,
              limit: Optional[float] = None, batch_size: int = 8, tokenizer: Optional[str] = None,
              seed: int = 1234) -> dict:
    """lm-eval's `simple_evaluate` on a checkpoint or an exported directory; returns its results dict."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    names, include = task_list(tasks)
    include += [str(Path(p).resolve()) for p in include_path or []]
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not set(names) <= set(manager.all_tasks):  # lm-eval's own tasks: ~20 s to index
        manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)} (a YAML file path, a name under "
                         f"--include-path, or one of lm-eval's {len(manager.all_tasks)} tasks)")
    loaded = load_hf(checkpoint, tokenizer)
    if loaded.tokenizer is None:
        raise ValueError(f"{checkpoint}: no tokenizer (a run on mock data?): tasks are text")
    config = loaded.model.config
    max_length = getattr(config, "max_position_embeddings", None) or config.n_positions
    lm = harness_lm(loaded.model, loaded.tokenizer, loaded.tokenizer_spec.eod_id, max_length, batch_size)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=num_fewshot,
                                       limit=limit, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                       torch_random_seed=seed, fewshot_random_seed=seed)
    except ConnectionError as err:  # datasets in offline mode, asked for data it does not have
        raise ValueError(f"--tasks {tasks}: the task's data is not on this machine and nothing is downloaded "
                         f"({err}); fill the Hugging Face datasets cache (HF_DATASETS_CACHE) on a machine with "
                         f"network access, or write a task YAML over local files") from None


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def write_results(results: dict, path: str) -> None:
    """The results (per-task metrics, configs, versions) as JSON, as lm-eval writes them."""
    from lm_eval.utils import handle_non_serializable

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
