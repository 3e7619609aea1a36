"""Sequence parallelism (parallel.sequence_parallel): the same function as one process and as plain TP2.

First-step gradients through Megatron's schedule (the helpers of tests/model/test_layout_equivalence.py):
TP2 + SP and TP2 x PP2 + SP against one process, every gradient including the norm weights; then `train(cfg)`
for 5 steps (TP2 + SP against TP2 and one process, with PP2 and with DP2 under ZeRO-2), resume, export, and
the config errors.
"""

from __future__ import annotations

import pytest
import torch

from fpa_megatron.testing import run_distributed
from tests.model.test_layout_equivalence import MICRO, SEQ, VARIANTS, _batches, _model, _rel, _run
from tests.training.test_trainer import BASE, _assert_same_steps, _run as _train, single, single_run  # noqa: F401

LAMBDA = 0.3
SP_VARIANTS = {
    **VARIANTS,  # LayerNorm / GeLU / tied (4 layers) and RMSNorm / SwiGLU / GQA / untied (2 layers)
    # per-head query/key norms: their gradients are partial over TP (each rank sees its heads), SP or not
    "qk_norm": dict(model=dict(num_layers=2, hidden_size=32, num_attention_heads=4, qk_layernorm=True),
                    target="probs", normalize="sum"),
}


def _attention_stats(model, penalty) -> dict:
    """The diagnostics' [L, H] statistics (collision, entropy, max logit) of one no-grad micro-batch."""
    from fpa_megatron.training.forward_backward import forward_backward

    penalty.stats.reset()
    penalty.stats.measuring = True
    with torch.no_grad():
        forward_backward(model, iter(_batches()[:1]), penalty, num_microbatches=1, micro_batch_size=MICRO,
                         seq_length=SEQ, forward_only=True)
    penalty.stats.measuring = False
    return penalty.stats.reduce()


def reference_rank():
    """One process: the global weights and the first step's loss, penalty, [L, H] and gradients."""
    from fpa_megatron.parallel.state import init_model_parallel

    init_model_parallel(1, 1, seed=1234)
    out = {}
    for name, variant in SP_VARIANTS.items():
        model, penalty = _model(variant)
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        out[name] = dict(state=state, run=dict(_run(model, penalty, LAMBDA), stats=_attention_stats(model, penalty)))
    return out


def sequence_parallel_rank(tp, pp, sp_values, states):
    """The same step under (TP, PP) with SP on and/or off; also what shows that SP is on: the hidden states a
    layer receives (the sequence split over TP), the core attention's query (the whole sequence), the
    parameters marked `sequence_parallel` and the norm modules built."""
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.parallel.weights import load_global_state

    init_model_parallel(tp, pp, seed=999)
    out = {}
    for sp in sp_values:
        for name, variant in SP_VARIANTS.items():
            model, penalty = _model(variant, sequence_parallel=sp)
            load_global_state(model, states[name])
            layer = model.decoder.layers[0]
            seen = {}

            def record(key: str, tensor) -> None:
                seen.setdefault(key, tensor.shape[0])  # [s, b, ...]

            layer.register_forward_pre_hook(lambda m, a, kw: record("layer", kw["hidden_states"]), with_kwargs=True)
            layer.self_attention.core_attention.register_forward_pre_hook(lambda m, a: record("attention", a[0]))
            run = _run(model, penalty, LAMBDA)
            run["stats"] = _attention_stats(model, penalty)
            marked = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
            norms = {type(m).__name__ for n, m in model.named_modules()
                     if n.endswith("layernorm") and len(list(m.parameters()))}
            out[sp, name] = dict(run, seen=seen, marked=marked, norms=norms)
    return out


@pytest.fixture(scope="module")
def reference():
    return run_distributed(reference_rank, 1)[0]


def variant_norm(name: str) -> str:
    return SP_VARIANTS[name]["model"].get("normalization", "LayerNorm")


def _assert_step_equal(mine: dict, want: dict, tol: float = 1e-5) -> None:
    assert _rel(mine["loss"], want["loss"]) <= tol
    assert _rel(mine["penalty"], want["penalty"]) <= tol and want["penalty"] > 0
    assert mine["matrix"].shape == want["matrix"].shape and _rel(mine["matrix"], want["matrix"]) <= tol
    assert set(mine["stats"]) == set(want["stats"]) and want["stats"]
    for stat, value in want["stats"].items():  # the attention diagnostics see the whole sequence too
        assert value.shape == mine["stats"][stat].shape and _rel(mine["stats"][stat], value) <= tol, stat
    assert set(mine["grads"]) == set(want["grads"])
    for pname, g in want["grads"].items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, pname
        assert _rel(mine["grads"][pname], g) <= tol, pname


@pytest.mark.parametrize("tp,pp,sp_values", [(2, 1, (True, False)), (2, 2, (True,))], ids=["tp2", "tp2pp2"])
def test_first_step_gradients_match_single_process(reference, tp, pp, sp_values):
    """Every gradient of the first step (norm weights and biases included) equals one process's, within 1e-5,
    with SP and, at TP2, without (which checks the q/k norms' TP sum)."""
    states = {name: ref["state"] for name, ref in reference.items()}
    got = run_distributed(sequence_parallel_rank, tp * pp, tp, pp, sp_values, states)
    for rank, rank_out in enumerate(got):
        last_stage = rank // tp == pp - 1  # Megatron's order: TP innermost
        for (sp, name), mine in rank_out.items():
            _assert_step_equal(mine, reference[name]["run"])
            assert mine["norms"] == {variant_norm(name)}  # torch's own, built by our spec
            assert mine["seen"] == {"layer": SEQ // tp if sp else SEQ, "attention": SEQ}
            if not sp:
                assert mine["marked"] == []
                continue
            marked = set(mine["marked"])
            assert any("final_layernorm" in n for n in marked) == last_stage
            assert any("input_layernorm" in n for n in marked) and any("pre_mlp_layernorm" in n for n in marked)
            assert all(n.endswith(("layernorm.weight", "layernorm.bias", "linear_proj.bias", "linear_fc2.bias"))
                       and "q_layernorm" not in n and "k_layernorm" not in n for n in marked)


# ---------------------------------------------------------------------------------------------- train(cfg)

SP = ["parallel.sequence_parallel=true"]
RMS = ["model.normalization=RMSNorm", "model.activation=swiglu", "model.tie_embeddings=false"]


def _assert_same_training(got: list, ref: list, tol: float = 1e-5) -> None:
    assert [h["step"] for h in got] == [1, 2, 3, 4, 5]
    for mine, want in zip(got, ref):
        for key in ("lm_loss", "penalty", "grad_norm"):
            assert abs(mine[key] - want[key]) <= tol * abs(want[key]), (key, mine, want)
        assert mine["lambda"] == want["lambda"] and mine["lr"] == want["lr"]


STEPS5 = ["train.steps=5", "checkpoint.interval=0"]


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """5 steps at TP2 with and without SP, each saving its final checkpoint: the TP2 references of the
    training tests and the runs that resume and export compare against."""
    runs = {}
    for name, extra in (("sp", SP), ("tp2", [])):
        root = tmp_path_factory.mktemp(f"saved-{name}")
        history = _train(root, 2, ["parallel.tensor=2"] + extra + STEPS5 + [
            "checkpoint.save_at_end=true", f"checkpoint.dir={root / 'ckpt'}"])
        runs[name] = (history, root / "ckpt")
    return runs


def test_tp2_sp_training_matches_tp2_and_single_process(single, saved_runs):
    sp, tp2 = saved_runs["sp"][0], saved_runs["tp2"][0]
    _assert_same_training(sp, single)
    _assert_same_training(sp, tp2)
    assert single[-1]["lm_loss"] < single[0]["lm_loss"]


@pytest.mark.parametrize("world,overrides", [
    (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    (4, ["parallel.tensor=2", "optimizer.zero_stage=2"]),  # DP2: ZeRO-2 reduces in backward, before our TP sum
], ids=["tp2pp2-sp", "tp2dp2-zero2-sp"])
def test_training_matches_tp2_and_single_process(tmp_path, single, saved_runs, world, overrides):
    got = _train(tmp_path, world, overrides + SP)
    _assert_same_training(got, single)
    _assert_same_training(got, saved_runs["tp2"][0])


def test_rmsnorm_training_matches_single_process(tmp_path):
    ref = _train(tmp_path / "one", 1, RMS)
    got = _train(tmp_path / "sp", 2, RMS + ["parallel.tensor=2"] + SP)
    _assert_same_training(got, ref)


# ------------------------------------------------------------------------------------------ resume, export

def test_resume_continues_bitwise(tmp_path, saved_runs):
    straight, _ = saved_runs["sp"]
    overrides = ["parallel.tensor=2"] + SP + STEPS5 + [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.resume=auto"]
    first = _train(tmp_path / "resumed", 2, overrides + ["train.exit_interval=3"])
    second = _train(tmp_path / "resumed", 2, overrides)
    assert [h["step"] for h in first] == [1, 2, 3] and [h["step"] for h in second] == [4, 5]
    _assert_same_steps(first + second, straight)


def test_export_from_a_sequence_parallel_checkpoint(saved_runs):
    """fpa-export's conversion of the SP checkpoint: the same tensors, under the same names, as the plain
    TP2 run's, which trained the same function (5 Adam steps amplify the summation-order rounding of tiny
    gradients, such as the biases', to ~1e-4 of a tensor; over all weights together the runs agree to 1e-5)."""
    from fpa_megatron.export.hf import to_hf
    from fpa_megatron.checkpoint.reader import read_model_checkpoint

    exports = {name: to_hf(read_model_checkpoint(str(ckpt)), with_tokenizer=False).model.state_dict()
               for name, (_, ckpt) in saved_runs.items()}
    sp, tp2 = exports["sp"], exports["tp2"]
    assert set(sp) == set(tp2) and any("ln" in n or "norm" in n for n in sp)
    for name, want in tp2.items():
        assert sp[name].shape == want.shape and torch.isfinite(sp[name]).all(), name
        assert _rel(sp[name], want) <= 1e-3, name
    names = sorted(tp2)
    assert _rel(torch.cat([sp[n].flatten() for n in names]), torch.cat([tp2[n].flatten() for n in names])) <= 1e-5


# -------------------------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("overrides,world,fragments", [
    (["parallel.sequence_parallel=true"], 1, ["parallel.sequence_parallel=true", "parallel.tensor=1"]),
    (["parallel.sequence_parallel=true", "parallel.tensor=4", "model.seq_length=18"], 4,
     ["parallel.sequence_parallel=true", "model.seq_length=18", "parallel.tensor=4"]),
    (["parallel.sequence_parallel=sometimes"], 1, ["parallel.sequence_parallel", "'sometimes'"]),
], ids=["tp1", "seq-not-divisible", "not-bool"])
def test_bad_sequence_parallel_config_is_rejected(overrides, world, fragments):
    from fpa_megatron.config import ConfigError, config_from_dict
    from fpa_megatron.preflight import check_config

    with pytest.raises(ConfigError) as err:
        check_config(config_from_dict(BASE, overrides), world)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    good = config_from_dict(BASE, ["parallel.sequence_parallel=true", "parallel.tensor=2"])
    assert check_config(good, 2).sequence_parallel is True


def test_presets_turn_it_on_wherever_tensor_parallel():
    from pathlib import Path

    from fpa_megatron.config import load_config
    from fpa_megatron.preflight import check_config

    presets = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert presets
    for path in presets:
        cfg = load_config(path, ["data.mock=true", "data.tokenizer=null"])
        assert cfg.parallel.sequence_parallel == (cfg.parallel.tensor > 1), path.name
    smaller_gpus = load_config(presets[0].parent / "gpt_1.3b.yaml", [
        "data.mock=true", "data.tokenizer=null", "parallel.tensor=2", "parallel.sequence_parallel=true"])
    assert check_config(smaller_gpus, 8).sequence_parallel
