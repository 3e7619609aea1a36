"""Context parallelism through `train(cfg)`: CP2 (and CP2 x TP2, with and without sequence parallelism, x PP2,
x DP2) follows the single-process run.

Each rank function runs several configurations one after another in the same gloo processes (train() sets
the model-parallel groups up anew each time), so the whole comparison costs one spawn per world size. Every
run records, besides the per-step metrics, the [L, H] penalty record of each step and every gradient of the
first step: averaged over DP x CP (what DeepSpeed applies) and gathered to global names.
"""

from __future__ import annotations

import math

import pytest
import torch

from fpa_megatron.testing import run_distributed

BASE = {
    "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 24, "vocab_size": 256,
              "attention_block_size": 4},
    "fpa": {"lambda0": 0.2, "gamma": 0.9},
    "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "zero_stage": 1},
    "data": {"mock": True},
    "train": {"steps": 5, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "seed": 3},
    "checkpoint": {"save_at_end": False, "resume": "none"},
    "logging": {"interval": 1, "tensorboard": False, "attention_stats_interval": 5},
}
VARIANTS = {
    # GPT-2 style: learned positions (indexed by the true positions after the split), probs, EOD masked
    "learned": ["model.position_embedding=learned", "data.eod_mask_loss=true"],
    # LLaMA style: rotary, GQA (4 heads, 2 groups), SwiGLU, RMSNorm, untied; logits target, mean normalization
    "rope_gqa": ["model.num_query_groups=2", "model.activation=swiglu", "model.normalization=RMSNorm",
                 "model.tie_embeddings=false", "model.ffn_hidden_size=48", "fpa.target=logits", "fpa.normalize=mean"],
    # FPA off: `auto` runs the penalty-free kernel across the CP ranks
    "rope_off": ["fpa.enabled=false"],
}
KEYS = ("lm_loss", "penalty", "lambda", "lr", "grad_norm")
TOL, LATER_TOL = 1e-5, 1e-4


def _first_step_grads(model) -> dict:
    """Every gradient of this step as DeepSpeed will apply it: the mean over DP x CP, then at global names."""
    from megatron.core import parallel_state

    from fpa_megatron.parallel.weights import gather_global

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    local = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        torch.distributed.all_reduce(grad, group=group)
        local[name] = grad / torch.distributed.get_world_size(group)
    return {name: g.cpu() for name, g in gather_global(model, local).items()}


def _train_recording(values: dict, overrides: list[str]) -> dict:
    """train(cfg), recording each step's [L, H] penalty record and the first step's gradients on the way
    (the trainer's own forward_backward and optimizer_step run unchanged)."""
    import fpa_megatron.training.trainer as trainer
    from fpa_megatron.config import config_from_dict

    matrices, grads, attention = [], {}, []
    real_forward_backward, real_optimizer_step = trainer.forward_backward, trainer.optimizer_step
    real_diagnostics = trainer.AttentionDiagnostics

    class AttentionDiagnostics(real_diagnostics):
        def measure(self):
            attention.append(super().measure())
            return attention[-1]

    def forward_backward(*args, **kwargs):
        result = real_forward_backward(*args, **kwargs)
        if not kwargs.get("forward_only"):
            matrices.append(result.penalty_matrix.clone())
        return result

    def optimizer_step(engine, lr):
        if not grads:
            grads.update(_first_step_grads(engine.module))
        return real_optimizer_step(engine, lr)

    trainer.forward_backward, trainer.optimizer_step = forward_backward, optimizer_step
    trainer.AttentionDiagnostics = AttentionDiagnostics
    try:
        history = trainer.train(config_from_dict(values, overrides))
    finally:
        trainer.forward_backward, trainer.optimizer_step = real_forward_backward, real_optimizer_step
        trainer.AttentionDiagnostics = real_diagnostics
    return dict(history=[{k: h.get(k) for k in KEYS + ("step",)} for h in history],
                matrices=matrices, grads=grads, attention=attention)


def train_rank(values: dict, runs: list[tuple[str, list[str]]]) -> dict:
    return {name: _train_recording(values, overrides + [f"logging.run_name={name}"]) for name, overrides in runs}


def _values(tmp_path) -> dict:
    return {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)}}


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()  # NaN never equals NaN
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_same_run(got: dict, ref: dict, fpa: bool = True, diagnostics: bool = True) -> None:
    """The first step (and the diagnostics before it) within TOL; the later steps within LATER_TOL: Adam's
    first updates are about lr * sign(g), so rounding-level differences of near-zero gradients grow.
    (`diagnostics`: compare the attention statistics; under DP2 each DP rank probes its own micro-batch.)"""
    assert [h["step"] for h in got["history"]] == [1, 2, 3, 4, 5]
    for step, (mine, want) in enumerate(zip(got["history"], ref["history"])):
        tol = TOL if step == 0 else LATER_TOL
        assert mine["lambda"] == want["lambda"] and mine["lr"] == want["lr"]
        for key in ("lm_loss", "grad_norm") + (("penalty",) if fpa else ()):
            assert _rel(mine[key], want[key]) <= tol, (key, mine, want)
    assert len(got["matrices"]) == len(ref["matrices"]) == 5
    for step, (mine, want) in enumerate(zip(got["matrices"], ref["matrices"])):
        assert mine.shape == want.shape
        if fpa:
            assert want.gt(0).all() and _rel(mine, want) <= (TOL if step == 0 else LATER_TOL)
        else:
            assert not mine.any() and not want.any()
    assert set(got["grads"]) == set(ref["grads"]) and ref["grads"]
    for name, g in ref["grads"].items():
        assert _rel(got["grads"][name], g) <= TOL, name
    # the attention diagnostics [L, H] before the first update and after the last (every key of the sequence
    # seen); the max logit after 5 updates is left out: a max of near-zero scores, it moves with the rounding
    assert len(got["attention"]) == len(ref["attention"]) == 2
    if not diagnostics:
        return
    for key, want in ref["attention"][0].items():
        assert _rel(got["attention"][0][key], want) <= TOL, key
    for key in ("collision", "entropy"):
        assert _rel(got["attention"][1][key], ref["attention"][1][key]) <= LATER_TOL, key


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process runs of every variant, in one process."""
    runs = [(name, overrides) for name, overrides in VARIANTS.items()]
    return run_distributed(train_rank, 1, _values(tmp_path_factory.mktemp("cp1")), runs)[0]


def test_cp2_trains_like_one_process(tmp_path, single):
    runs = [(name, overrides + ["parallel.context=2"]) for name, overrides in VARIANTS.items()]
    got = run_distributed(train_rank, 2, _values(tmp_path), runs)
    for rank_out in got:  # every rank holds the reduced values
        for name in VARIANTS:
            assert_same_run(rank_out[name], single[name], fpa=name != "rope_off")
    # sanity: the runs learn, lambda decays, and the variants differ from each other
    ref = single["learned"]["history"]
    assert ref[-1]["lm_loss"] < ref[0]["lm_loss"]
    assert [h["lambda"] for h in ref] == pytest.approx([0.2 * 0.9**t for t in range(5)], rel=1e-12)
    assert single["rope_gqa"]["history"][0]["penalty"] != single["learned"]["history"][0]["penalty"]


def test_cp2_with_tp2_pp2_dp2_trains_like_one_process(tmp_path, single):
    """4 ranks: CP2 x TP2, CP2 x TP2 with sequence parallelism (each CP rank's 12 tokens scattered over TP, the
    norms' partial gradients summed over TP), CP2 x PP2 (1F1B, tied embeddings across stages) and CP2 x DP2
    with ZeRO-1."""
    layouts = {"cp2tp2": ["parallel.tensor=2"], "cp2tp2sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
               "cp2pp2": ["parallel.pipeline=2"], "cp2dp2": []}
    runs = [(layout, VARIANTS["rope_gqa"] + ["parallel.context=2"] + extra) for layout, extra in layouts.items()]
    got = run_distributed(train_rank, 4, _values(tmp_path), runs)
    for rank_out in got:
        for layout in layouts:
            assert_same_run(rank_out[layout], single["rope_gqa"], diagnostics=layout != "cp2dp2")
    assert all(math.isfinite(h["grad_norm"]) for h in single["rope_gqa"]["history"])
