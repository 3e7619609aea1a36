"""The studies of `fpa-ablate`: each one prepares its data and base config, lists its runs (arms x settings x
seeds: the same data, steps and seeds in every arm), and turns the finished runs into `report.md`.

Sizes (`SCALES`): `default` is the documented study (each <= 20 minutes on 2 CPU cores with 2 single-thread
runs at a time, estimated from measured step times), `quick` a smoke run of a couple of minutes, and `tiny`
(hidden) what the tests run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from data_prep.cli import main as prep
from data_prep.synthetic import MQARSpec
from fpa_megatron.studies import report as rp
from fpa_megatron.studies.runner import LOG_FILE, RunSpec, run_dir

SCALES = ("default", "quick", "tiny")

# The demo model (configs/demo_cpu.yaml) and its optimizer: the lambda and lr-sweep studies train it on one rank.
DEMO_MODEL = dict(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512, seq_length=128,
                  max_position_embeddings=128, position_embedding="learned", normalization="LayerNorm",
                  activation="gelu", tie_embeddings=True, attention_impl="eager")
TINY_MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, seq_length=32,
                  max_position_embeddings=32, position_embedding="learned")
DEMO_FPA = dict(gamma=0.995, min_lambda=1e-4, target="probs", normalize="mean")

# Loss spikes (lr-sweep): a logged training loss above SPIKE_FACTOR x the median of the previous
# SPIKE_WINDOW logged losses (at least SPIKE_MIN_HISTORY of them) starts a spike; consecutive such steps are
# one spike; a non-finite loss is one spike and ends the count (the run diverged).
SPIKE_FACTOR, SPIKE_WINDOW, SPIKE_MIN_HISTORY = 1.5, 20, 5


def count_spikes(losses: list[tuple[int, float]]) -> int:
    spikes, inside = 0, False
    history: list[float] = []
    for _, loss in losses:
        if not math.isfinite(loss):
            return spikes + 1
        is_spike = len(history) >= SPIKE_MIN_HISTORY and loss > SPIKE_FACTOR * float(np.median(history[-SPIKE_WINDOW:]))
        if is_spike and not inside:
            spikes += 1
        inside = is_spike
        history.append(loss)
    return spikes


def lambda_arms(lambdas, seeds: int) -> list[RunSpec]:
    """One arm per lambda_0 (0 = FPA off: `fpa.enabled=false`), seeds 1 .. seeds each."""
    specs = []
    for lam in lambdas:
        fpa = ("fpa.enabled=false",) if lam == 0 else ("fpa.enabled=true", f"fpa.lambda0={lam:g}")
        arm = "fpa_off" if lam == 0 else f"lambda0_{lam:g}"
        specs += [RunSpec(arm, seed, fpa, {"lambda0": lam}) for seed in range(1, seeds + 1)]
    return specs


# --------------------------------------------------------------------------------------------- data


def prepare_demo_corpus(data_dir: Path, scale: str) -> tuple[Path, Path]:
    """The demo corpus, tokenizer and merged shards, exactly as scripts/demo.sh makes them (reused if present).

    `tiny` makes a small one instead (0.25 MiB of text, 512 pieces) for the tests. Returns (prefix, tokenizer).
    """
    tiny = scale == "tiny"
    corpus, tokenizer = data_dir / "corpus" / "stdlib.jsonl", data_dir / "tokenizer" / "spm.model"
    shards, prefix = data_dir / "shards", data_dir / "shards" / "stdlib"

    def step(args: list[str]) -> None:
        print("fpa-prep " + " ".join(args), flush=True)
        if prep(args) != 0:
            raise RuntimeError(f"fpa-prep {args[0]} failed")

    if not corpus.is_file():
        step(["corpus", "--out", str(corpus.parent)] + (["--max-mb", "0.25"] if tiny else []))
    if not tokenizer.is_file():
        step(["tokenizer", "--input", str(corpus), "--out", str(tokenizer.with_suffix("")),
              "--vocab-size", "512" if tiny else "8192", "--seed", "1234"])
    if not Path(str(prefix) + ".idx").is_file():
        step(["encode", "--input", str(corpus), "--tokenizer", str(tokenizer), "--out-dir", str(shards),
              "--name", "stdlib", "--num-shards", "2", "--workers", "2", "--no-progress"])
        step(["merge", str(shards)])
    return prefix.resolve(), tokenizer.resolve()


# --------------------------------------------------------------------------------------------- the studies


@dataclass
class Study:
    """Base: a study at one scale. Subclasses set `name`, `sizes` and implement the four steps."""

    scale: str
    out: Path
    data_dir: Path
    seq_length: Optional[int] = None  # recall: the MQAR sequence length (None: the study's own)
    buckets: Optional[tuple] = None  # recall: key-to-query distance buckets ((lo, hi), ...); None: the study's
    name = ""
    sizes = {}  # scale -> parameters (a class attribute of each study)

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r}: expected one of {SCALES}")
        self.size = self.sizes[self.scale]

    @property
    def default_seeds(self) -> int:
        return self.size["seeds"]

    def base_config(self) -> dict:
        """The config every run starts from (arms add overrides). Prepares the data it needs."""
        raise NotImplementedError

    def runs(self, seeds: int) -> list[RunSpec]:
        raise NotImplementedError

    def after_training(self, specs: list[RunSpec], done: dict) -> None:
        """Anything a run needs besides its training (recall evaluation)."""

    def report(self, specs: list[RunSpec], done: dict) -> tuple[str, dict]:
        """(report.md text, the same numbers as a dict for report.json); writes the plots."""
        raise NotImplementedError

    # helpers shared by the studies

    def common(self, steps: int, eval_interval: int, stats_interval: int, log_interval: int) -> dict:
        return {
            "parallel": {"tensor": 1, "pipeline": 1},
            # the studies observe instability, so the guard only warns: a spike keeps its update (no skip,
            # no rollback) and a diverged run goes on to its last step instead of stopping
            "train": {"steps": steps, "eval_interval": eval_interval, "eval_iters": self.size.get("eval_iters", 4),
                      "max_consecutive_skips": steps, "spike": {"policy": "warn"}},
            "checkpoint": {"resume": "none", "save_at_end": False, "keep_last": 1},
            "logging": {"interval": log_interval, "attention_stats_interval": stats_interval, "tensorboard": True,
                        "heatmap_interval": stats_interval, "peak_tflops": 1.0},
        }

    @property
    def corpus_split(self) -> str:
        """Train/validation split of the demo corpus (no test split: the studies do not use one; the tiny
        corpus has only ~20 documents)."""
        return "80,20,0" if self.scale == "tiny" else "96,4,0"

    def scalars(self, spec: RunSpec) -> dict:
        return rp.read_scalars(run_dir(self.out, spec))

    def status(self, done: Optional[dict]) -> str:
        if done is None:
            return "not run"
        return "ok" if done["returncode"] == 0 else f"failed (exit {done['returncode']})"

    def curves(self, specs: list[RunSpec], tag: str, arms: list[str], scalars: dict) -> dict:
        return {arm: [scalars[s.name].get(tag, []) for s in specs if s.arm == arm] for arm in arms}

    def summary_tables(self, per_run: dict, columns: list[tuple[str, str, int]]) -> tuple[str, str, dict]:
        """Markdown tables of `columns` (key, label, digits): per arm (mean ± std over seeds) and per run;
        and the per-arm numbers {arm: {key: (mean, std)}} for report.json."""
        arms = list(dict.fromkeys(r["arm"] for r in per_run.values()))
        arm_rows, numbers = [], {}
        for arm in arms:
            runs = [r for r in per_run.values() if r["arm"] == arm]
            numbers[arm] = {key: rp.mean_std([r[key] for r in runs]) for key, _, _ in columns}
            arm_rows.append([arm] + [rp.fmt_mean_std([r[key] for r in runs], d) for key, _, d in columns])
        run_rows = [[name, r["arm"], r["seed"]] + [rp.fmt(r[key], d) for key, _, d in columns] + [r["status"]]
                    for name, r in per_run.items()]
        labels = [label for _, label, _ in columns]
        return (rp.table(["arm"] + labels, arm_rows), rp.table(["run", "arm", "seed"] + labels + ["status"], run_rows),
                numbers)

    def model_text(self) -> str:
        m = self.size["model"]
        return (f"{m['num_layers']} layers x {m['hidden_size']}, {m['num_attention_heads']} heads, "
                f"sequence {m.get('seq_length', getattr(self, 'SEQ', None))}")

    def header(self, title: str, command: str, seeds: int, text: str) -> list[str]:
        return [f"## {title}", "", f"Reproduce: `{command}`", "", text.strip(), "",
                f"Scale `{self.scale}`, {seeds} seed(s) per arm; mean ± sample standard deviation over seeds.", ""]


class LambdaStudy(Study):
    """lambda_0 in {0 (FPA off), 0.01, 0.1, 1} on the demo corpus and model: validation loss, collision and
    entropy over time, final perplexity."""

    name = "lambda"
    sizes = {
        "default": dict(steps=250, lambdas=(0.0, 0.01, 0.1, 1.0), seeds=3, eval_interval=25, stats_interval=25,
                        model=DEMO_MODEL, micro=8, batch=16),
        "quick": dict(steps=30, lambdas=(0.0, 0.1), seeds=2, eval_interval=10, stats_interval=10, eval_iters=2,
                      model=DEMO_MODEL, micro=8, batch=16),
        "tiny": dict(steps=6, lambdas=(0.0, 1.0), seeds=2, eval_interval=3, stats_interval=3, eval_iters=1,
                     model=TINY_MODEL, micro=4, batch=4),
    }

    def base_config(self) -> dict:
        prefix, tokenizer = prepare_demo_corpus(self.data_dir, self.scale)
        s = self.size
        cfg = self.common(s["steps"], s["eval_interval"], s["stats_interval"], log_interval=5 if s["steps"] > 50 else 1)
        cfg["model"] = dict(s["model"])
        cfg["fpa"] = dict(DEMO_FPA)
        cfg["optimizer"] = dict(lr=1.5e-3, min_lr=1e-4, warmup_steps=min(20, s["steps"] // 5), grad_clip=1.0,
                                zero_stage=1)
        cfg["data"] = dict(prefixes=[str(prefix)], tokenizer=str(tokenizer), split=self.corpus_split)
        cfg["train"].update(micro_batch_size=s["micro"], global_batch_size=s["batch"])
        return cfg

    def runs(self, seeds: int) -> list[RunSpec]:
        return lambda_arms(self.size["lambdas"], seeds)

    def report(self, specs, done):
        arms = list(dict.fromkeys(s.arm for s in specs))
        scalars = {s.name: self.scalars(s) if done.get(s.name) else {} for s in specs}
        per_run = {}
        for s in specs:
            sc = scalars[s.name]
            per_run[s.name] = dict(arm=s.arm, seed=s.seed, lambda0=s.values["lambda0"], status=self.status(done.get(s.name)),
                                   val_loss=rp.last(sc, "val/loss"), val_ppl=rp.last(sc, "val/ppl"),
                                   collision=rp.last(sc, "attention/collision"), entropy=rp.last(sc, "attention/entropy"),
                                   entropy_min=rp.last(sc, "attention/entropy_min"),
                                   max_logit=rp.last(sc, "attention/max_logit"))
        columns = [("val_loss", "final val loss", 4), ("val_ppl", "final val ppl", 2), ("collision", "collision", 4),
                   ("entropy", "entropy (nats)", 3), ("entropy_min", "lowest head entropy", 3),
                   ("max_logit", "max logit", 2)]
        arm_table, run_table, arm_numbers = self.summary_tables(per_run, columns)
        plots = self.out / "plots"
        for tag, file, label in (("val/loss", "val_loss.png", "validation loss"),
                                 ("train/lm_loss", "train_loss.png", "training LM loss"),
                                 ("attention/collision", "collision.png", "mean collision probability"),
                                 ("attention/entropy", "entropy.png", "mean attention entropy (nats)")):
            rp.plot_curves(plots / file, self.curves(specs, tag, arms, scalars), f"{label} by lambda_0", label)
        seeds = max(s.seed for s in specs)
        lines = self.header(
            "lambda_0: does the penalty change what the model learns?",
            f"fpa-ablate lambda{'' if self.scale == 'default' else ' --' + self.scale} --seeds {seeds}", seeds,
            f"""
The {'demo ' if self.size['model'] is DEMO_MODEL else ''}model ({self.model_text()}) on the {'demo' if self.scale != 'tiny' else 'tiny'} corpus, one rank, batch
{self.size['batch']} sequences, {self.size['steps']} steps, lambda_t = lambda_0 x {DEMO_FPA['gamma']}^t with the
penalty normalized to the mean collision probability (`fpa.normalize: mean`); arm `fpa_off` is FPA off
(`fpa.enabled: false`). Attention statistics are measured on one fixed validation micro-batch every
{self.size['stats_interval']} steps, FPA on or off; final values are those at the last step.""")
        lines += ["### Final values per arm", "", arm_table, "",
                  "![validation loss](plots/val_loss.png)", "![collision](plots/collision.png)",
                  "![entropy](plots/entropy.png)", "![training loss](plots/train_loss.png)", "",
                  "### Every run", "", run_table, ""]
        return "\n".join(lines), {"runs": per_run, "arms": arm_numbers}


class LRSweepStudy(Study):
    """Stability: learning rates 1e-3 .. 1e-1 without warmup, arms FPA off, FPA on, QK-layernorm."""

    name = "lr-sweep"
    sizes = {
        "default": dict(steps=150, lrs=tuple(np.logspace(-3, -1, 5).round(6)), seeds=2, stats_interval=10,
                        model=DEMO_MODEL, micro=8, batch=8),
        "quick": dict(steps=30, lrs=(1e-3, 1e-1), seeds=2, stats_interval=5, eval_iters=2, model=DEMO_MODEL,
                      micro=8, batch=8),
        "tiny": dict(steps=6, lrs=(1e-3, 1e-1), seeds=1, stats_interval=3, eval_iters=1, model=TINY_MODEL,
                     micro=4, batch=4),
    }
    ARMS = {"fpa_off": ("fpa.enabled=false",),
            "fpa_on": ("fpa.enabled=true", "fpa.lambda0=0.1"),
            "qk_layernorm": ("fpa.enabled=false", "model.qk_layernorm=true")}

    def base_config(self) -> dict:
        prefix, tokenizer = prepare_demo_corpus(self.data_dir, self.scale)
        s = self.size
        cfg = self.common(s["steps"], s["steps"], s["stats_interval"], log_interval=1)
        cfg["model"] = dict(s["model"])
        cfg["fpa"] = dict(DEMO_FPA)
        cfg["optimizer"] = dict(warmup_steps=0, grad_clip=1.0, zero_stage=1)
        cfg["data"] = dict(prefixes=[str(prefix)], tokenizer=str(tokenizer), split=self.corpus_split)
        cfg["train"].update(micro_batch_size=s["micro"], global_batch_size=s["batch"])
        return cfg

    def runs(self, seeds: int) -> list[RunSpec]:
        specs = []
        for arm, overrides in self.ARMS.items():
            for lr in self.size["lrs"]:
                for seed in range(1, seeds + 1):
                    name = f"{arm}_lr{lr:g}"
                    specs.append(RunSpec(name, seed, overrides + (f"optimizer.lr={lr:g}", f"optimizer.min_lr={lr / 10:g}"),
                                         {"arm": arm, "lr": float(lr)}))
        return specs

    def run_numbers(self, spec: RunSpec, done: Optional[dict]) -> dict:
        sc = self.scalars(spec) if done else {}
        init, final = rp.first(sc, "val/loss"), rp.last(sc, "val/loss")
        finished = done is not None and done["returncode"] == 0 and rp.finite([final]) != []
        diverged = not finished or final > init
        capped = init if diverged else final  # Wortsman et al.: min(final loss, loss at initialization)
        entropy_min = rp.finite(v for _, v in sc.get("attention/entropy_min", []))
        max_logit = rp.finite(v for _, v in sc.get("attention/max_logit", []))
        return dict(arm=spec.values["arm"], lr=spec.values["lr"], seed=spec.seed, status=self.status(done),
                    init_loss=init, final_loss=final, capped_loss=capped, diverged=diverged,
                    spikes=count_spikes(sc.get("train/lm_loss", [])),
                    lowest_entropy=min(entropy_min, default=math.nan), max_logit=max(max_logit, default=math.nan))

    def report(self, specs, done):
        per_run = {s.name: self.run_numbers(s, done.get(s.name)) for s in specs}
        arms, lrs = list(self.ARMS), list(self.size["lrs"])
        seeds = sorted({s.seed for s in specs})
        runs_of = lambda arm, lr=None: [r for r in per_run.values() if r["arm"] == arm and (lr is None or r["lr"] == lr)]
        numbers: dict = {"runs": per_run, "arms": {}}
        loss_rows, stability_rows = [], []
        for arm in arms:
            sensitivities = []
            for seed in seeds:
                capped = [r["capped_loss"] for r in runs_of(arm) if r["seed"] == seed]
                if rp.finite(capped) and len(rp.finite(capped)) == len(capped):
                    sensitivities.append(float(np.mean(capped) - np.min(capped)))
            runs = runs_of(arm)
            numbers["arms"][arm] = dict(
                final_loss={f"{lr:g}": rp.mean_std([r["capped_loss"] for r in runs_of(arm, lr)]) for lr in lrs},
                lr_sensitivity=rp.mean_std(sensitivities), spikes=sum(r["spikes"] for r in runs),
                diverged=sum(r["diverged"] for r in runs),
                lowest_entropy=min(rp.finite(r["lowest_entropy"] for r in runs), default=math.nan),
                max_logit=max(rp.finite(r["max_logit"] for r in runs), default=math.nan))
            a = numbers["arms"][arm]
            loss_rows.append([arm] + [rp.fmt_mean_std([r["capped_loss"] for r in runs_of(arm, lr)], 3) for lr in lrs])
            stability_rows.append([arm, rp.fmt_mean_std(sensitivities, 3), a["spikes"], f"{a['diverged']} of {len(runs)}",
                                   rp.fmt(a["lowest_entropy"], 3), rp.fmt(a["max_logit"], 2)])
        run_rows = [[name, r["arm"], f"{r['lr']:g}", r["seed"], rp.fmt(r["init_loss"], 3), rp.fmt(r["final_loss"], 3),
                     rp.fmt(r["capped_loss"], 3), r["spikes"], rp.fmt(r["lowest_entropy"], 3), rp.fmt(r["max_logit"], 2),
                     r["status"]] for name, r in per_run.items()]
        plots = self.out / "plots"
        series = lambda key: {arm: [[r[key] for r in runs_of(arm, lr)] for lr in lrs] for arm in arms}
        rp.plot_points(plots / "final_loss_vs_lr.png", lrs, series("capped_loss"), "final validation loss (capped)",
                       "peak learning rate", "loss", logx=True)
        rp.plot_points(plots / "lowest_entropy_vs_lr.png", lrs, series("lowest_entropy"),
                       "lowest head entropy reached", "peak learning rate", "entropy (nats)", logx=True)
        rp.plot_points(plots / "max_logit_vs_lr.png", lrs, series("max_logit"), "largest attention logit reached",
                       "peak learning rate", "max logit", logx=True)
        top = max(lrs)
        top_curves = {arm: [self.scalars(s).get("train/lm_loss", []) for s in specs
                            if s.values["arm"] == arm and s.values["lr"] == top and done.get(s.name)] for arm in arms}
        rp.plot_curves(plots / "train_loss_top_lr.png", top_curves, f"training loss at lr {top:g}", "LM loss")
        lines = self.header(
            "Learning-rate sweep: stability without warmup",
            f"fpa-ablate lr-sweep{'' if self.scale == 'default' else ' --' + self.scale} --seeds {len(seeds)}", len(seeds),
            f"""
The {'demo ' if self.size['model'] is DEMO_MODEL else ''}model ({self.model_text()}) on the {'demo' if self.scale != 'tiny' else 'tiny'} corpus, one rank, batch {self.size['batch']} sequences, {self.size['steps']} steps,
no warmup, cosine decay to lr/10, AdamW (weight decay 0.1, gradient clipping 1.0). Arms: `fpa_off`,
`fpa_on` (lambda_0 = 0.1, gamma {DEMO_FPA['gamma']}, mean-normalized), `qk_layernorm` (FPA off, Megatron's
per-head query/key LayerNorm, `model.qk_layernorm: true`).

- **Final loss** = validation loss after the last step. A run that diverged (non-finite final loss, a
  failed run, or a final loss above the loss at initialization) counts with its loss at initialization
  (the validation loss at step 0): min(final, initial), as in Wortsman et al. 2023.
- **LR sensitivity** (Wortsman et al. 2023) = mean over the learning rates of the final loss minus the
  best final loss over the learning rates, per seed; mean ± std over seeds. Lower is more stable.
- **Loss spikes**: a training-loss step above {SPIKE_FACTOR} x the median of the previous {SPIKE_WINDOW} steps
  (after {SPIKE_MIN_HISTORY} steps); consecutive such steps count once; a non-finite loss counts once and
  ends the count. Summed over all runs of the arm.
- **Lowest head entropy**: the smallest per-head attention entropy measured (one validation micro-batch
  every {self.size['stats_interval']} steps) over all runs of the arm; **max logit**: the largest attention
  logit measured.""")
        lines += ["### Final validation loss per peak learning rate", "",
                  rp.table(["arm"] + [f"lr {lr:g}" for lr in lrs], loss_rows), "",
                  "### Stability per arm", "",
                  rp.table(["arm", "LR sensitivity", "loss spikes", "diverged runs", "lowest head entropy",
                            "max logit"], stability_rows), "",
                  "![final loss vs lr](plots/final_loss_vs_lr.png)", "![lowest entropy](plots/lowest_entropy_vs_lr.png)",
                  "![max logit](plots/max_logit_vs_lr.png)", "![training loss at the top lr](plots/train_loss_top_lr.png)",
                  "", "### Every run", "",
                  rp.table(["run", "arm", "lr", "seed", "initial loss", "final loss", "capped", "spikes",
                            "lowest head entropy", "max logit", "status"], run_rows), ""]
        return "\n".join(lines), numbers


class RecallStudy(Study):
    """Long-range memory: MQAR query accuracy per key-to-query distance, FPA off and on at several lambda_0."""

    name = "recall"
    sizes = {
        "default": dict(steps=1500, lambdas=(0.0, 0.01, 0.1, 1.0), seeds=2, train_sequences=40000, test_sequences=500, lr=1e-2,
                        micro=32, eval_interval=100, stats_interval=50,
                        model=dict(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512)),
        "quick": dict(steps=60, lambdas=(0.0, 0.1), seeds=2, train_sequences=4000, test_sequences=100, micro=32, lr=1e-2,
                      eval_interval=20, stats_interval=20, eval_iters=2,
                      model=dict(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512)),
        "tiny": dict(steps=6, lambdas=(0.0, 1.0), seeds=2, train_sequences=400, test_sequences=20, micro=8, lr=1e-2,
                     eval_interval=3, stats_interval=3, eval_iters=1,
                     model=dict(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64)),
    }
    SEQ, PAIRS, VOCAB, GAMMA = 64, 4, 256, 0.999
    BUCKETS = ((4, 15), (16, 29), (30, 43), (44, 58))  # key-to-query distances (this layout allows 4 .. 58)

    @property
    def seq(self) -> int:
        """The sequence length: --seq-length (thousands of tokens, with parallel.context) or SEQ."""
        return self.seq_length or self.SEQ

    @property
    def distance_buckets(self) -> tuple:
        """--buckets, else BUCKETS at the default length, else the distances this layout allows in 4 equal parts."""
        if self.buckets:
            return tuple(self.buckets)
        if self.seq == self.SEQ:
            return self.BUCKETS

        lo, hi = MQARSpec(seq_length=self.seq, num_pairs=self.PAIRS, vocab_size=self.VOCAB).distance_bounds()
        edges = [lo + round(i * (hi + 1 - lo) / 4) for i in range(5)]
        return tuple((a, b - 1) for a, b in zip(edges, edges[1:]))

    @property
    def test_prefix(self) -> str:
        return str((self.out / "data" / "test").resolve())

    def base_config(self) -> dict:
        data, s = self.out / "data", self.size
        for name, count, seed in (("train", s["train_sequences"], 1), ("test", s["test_sequences"], 2)):
            if (data / f"{name}.idx").is_file():
                continue
            args = ["synthetic", "mqar", "--out-dir", str(data), "--name", name, "--num-sequences", str(count),
                    "--seq-length", str(self.seq), "--num-pairs", str(self.PAIRS), "--vocab-size", str(self.VOCAB),
                    "--seed", str(seed)]
            print("fpa-prep " + " ".join(args), flush=True)
            if prep(args) != 0:
                raise RuntimeError(f"fpa-prep synthetic failed for {name}")
        cfg = self.common(s["steps"], s["eval_interval"], s["stats_interval"], log_interval=10 if s["steps"] > 50 else 1)
        cfg["model"] = dict(s["model"], seq_length=self.seq, vocab_size=self.VOCAB, position_embedding="rope")
        cfg["fpa"] = dict(DEMO_FPA, gamma=self.GAMMA)
        # lr 1e-2 with 100 warmup steps learned recall fastest of 1e-3, 3e-3, 6e-3, 1e-2 (24 % after 1500 steps)
        cfg["optimizer"] = dict(lr=s["lr"], min_lr=3e-4, warmup_steps=min(100, s["steps"] // 5), grad_clip=1.0,
                                zero_stage=1)
        cfg["data"] = dict(prefixes=[str((data / "train").resolve())], tokenizer=None, split="98,2,0",
                           eod_mask_loss=True)
        cfg["train"].update(micro_batch_size=s["micro"], global_batch_size=s["micro"])
        cfg["checkpoint"].update(save_at_end=True)
        return cfg

    def runs(self, seeds: int) -> list[RunSpec]:
        return lambda_arms(self.size["lambdas"], seeds)

    def after_training(self, specs, done):
        """Score every finished run without a recall.json, all in one single-rank process."""
        todo = [str(run_dir(self.out, s)) for s in specs
                if done.get(s.name) and done[s.name]["returncode"] == 0
                and not (run_dir(self.out, s) / "recall.json").is_file()]
        if not todo:
            return
        command = [sys.executable, "-m", "fpa_megatron.studies.recall", "--num-pairs", str(self.PAIRS),
                   "--test", self.test_prefix, "--buckets", *[f"{lo}-{hi}" for lo, hi in self.distance_buckets], "--",
                   *todo]
        print(f"evaluating recall of {len(todo)} run(s)", flush=True)
        with open(self.out / "recall_eval.log", "a") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise RuntimeError(f"recall evaluation failed (exit {result.returncode}): see {self.out / 'recall_eval.log'}")

    def report(self, specs, done):
        arms = list(dict.fromkeys(s.arm for s in specs))

        buckets = [rp.bucket_name(lo, hi) for lo, hi in self.distance_buckets]
        per_run = {}
        scalars = {s.name: self.scalars(s) if done.get(s.name) else {} for s in specs}
        for s in specs:
            path = run_dir(self.out, s) / "recall.json"
            recall = json.loads(path.read_text()) if path.is_file() else {"buckets": {}, "overall": {}}
            acc = {b: recall["buckets"].get(b, {}).get("accuracy", math.nan) for b in buckets}
            sc = scalars[s.name]
            per_run[s.name] = dict(arm=s.arm, seed=s.seed, lambda0=s.values["lambda0"], status=self.status(done.get(s.name)),
                                   **{f"accuracy {b}": acc[b] for b in buckets},
                                   **{f"queries {b}": recall["buckets"].get(b, {}).get("queries", 0) for b in buckets},
                                   overall=recall["overall"].get("accuracy", math.nan),
                                   val_loss=rp.last(sc, "val/loss"), entropy=rp.last(sc, "attention/entropy"),
                                   entropy_min=rp.last(sc, "attention/entropy_min"))
        columns = ([(f"accuracy {b}", f"distance {b[1:]}", 3) for b in buckets]
                   + [("overall", "overall", 3), ("val_loss", "final val loss", 4), ("entropy_min", "lowest head entropy", 3)])
        arm_table, run_table, arm_numbers = self.summary_tables(per_run, columns)
        plots = self.out / "plots"
        rp.plot_points(plots / "accuracy_vs_distance.png", buckets,
                       {arm: [[r[f"accuracy {b}"] for r in per_run.values() if r["arm"] == arm] for b in buckets]
                        for arm in arms}, "MQAR query accuracy", "key-to-query distance", "accuracy",
                       xticklabels=buckets)
        rp.plot_curves(plots / "val_loss.png", self.curves(specs, "val/loss", arms, scalars), "validation loss", "loss")
        rp.plot_curves(plots / "entropy.png", self.curves(specs, "attention/entropy", arms, scalars),
                       "mean attention entropy", "entropy (nats)")
        seeds = max(s.seed for s in specs)
        first = next(iter(per_run.values()))
        queries = ", ".join(f"{first[f'queries {b}']} at distance {b[1:]}" for b in buckets)
        s = self.size
        lines = self.header(
            "Recall: multi-query associative recall at growing distances",
            f"fpa-ablate recall{'' if self.scale == 'default' else ' --' + self.scale} --seeds {seeds}"
            + (f" --seq-length {self.seq}" if self.seq != self.SEQ else "")
            + (" --buckets " + " ".join(f"{lo}-{hi}" for lo, hi in self.buckets) if self.buckets else ""), seeds,
            f"""
Zoology's MQAR (Arora et al. 2023) in its minimal setting: vocabulary {self.VOCAB}, sequences of {self.seq}
tokens, {self.PAIRS} key-value pairs at the start, every key queried once later (`fpa-prep synthetic mqar`);
a {s['model']['num_layers']}-layer, {s['model']['hidden_size']}-wide GPT ({s['model']['num_attention_heads']} heads, rotary
positions), {s['steps']} steps of {s['micro']} sequences (from {s['train_sequences']:,}), lr {s['lr']:g}, trained on the
answers: EOD precedes every unpredictable token and `data.eod_mask_loss=true` leaves those out of the loss. FPA
arms: lambda_t = lambda_0 x {self.GAMMA}^t, mean-normalized; arm `fpa_off` is FPA off. **Accuracy**: on
{s['test_sequences']} held-out sequences ({s['test_sequences'] * self.PAIRS} queries: {queries}), the fraction of queries
whose most likely next token (whole vocabulary) is the stored value, per key-to-query distance bucket and
overall, scored from the final checkpoint (`recall.json` in each run directory); chance is about 1/127.""")
        lines += ["### Query accuracy per key-to-query distance", "", arm_table, "",
                  "![accuracy vs distance](plots/accuracy_vs_distance.png)", "![validation loss](plots/val_loss.png)",
                  "![entropy](plots/entropy.png)", "", "### Every run", "", run_table, ""]
        return "\n".join(lines), {"runs": per_run, "arms": arm_numbers}


STUDIES = {study.name: study for study in (LambdaStudy, LRSweepStudy, RecallStudy)}


def failed_runs(done: dict) -> list[str]:
    return [name for name, d in done.items() if d is None or d["returncode"] != 0]


def log_hint(out: Path, name: str) -> str:
    return str(out / "runs" / name / LOG_FILE)
