"""`fpa-reshard`: a TP2 x PP2 checkpoint continues in other layouts exactly as in its own.

One spawn of 4 gloo ranks (module fixture) trains the reference at TP2 x PP2 x DP1 for 6 steps with a checkpoint
at step 3, rewrites that checkpoint with the CLI for TP1 x PP1 x DP4, TP1 x PP2 x DP2 and TP2 x PP1 x DP2, and
resumes each with the real trainer for steps 4-6 (each of those runs saves its own step-6 checkpoint through
DeepSpeed, which the format test compares with ours). The model uses SwiGLU, GQA and tied embeddings (the
fc1 [gate; up] shards, query groups per rank, the last stage's copy of the embeddings) and a vocabulary of 100,
which TP 2 pads to 256 rows and TP 1 to 128 unless the checkpoint's padding is kept.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from fpa_megatron.testing import run_distributed

MODEL = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "seq_length": 32,
         "vocab_size": 100, "activation": "swiglu", "normalization": "RMSNorm", "tie_embeddings": True}
BASE = {
    "model": MODEL,
    "fpa": {"lambda0": 0.2, "gamma": 0.9},
    "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "zero_stage": 1},
    "data": {"mock": True},
    "train": {"steps": 6, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "seed": 3},
    "checkpoint": {"interval": 3, "keep_last": 2, "save_at_end": False, "resume": "none"},
    "logging": {"interval": 1, "tensorboard": False},
}
KEYS = ("lm_loss", "penalty", "grad_norm", "lambda", "lr", "step")
TARGETS = {"tp1pp1dp4": (1, 1, 4), "tp1pp2dp2": (1, 2, 2), "tp2pp1dp2": (2, 1, 2)}


def _session(values: dict, root: str) -> dict:
    """Each rank: the reference run, the CLI on rank 0, then every resharded layout resumed for 3 steps."""
    import torch.distributed as dist

    from fpa_megatron.config import config_from_dict, load_config
    from fpa_megatron.checkpoint.cli import reshard_main as reshard_main
    from fpa_megatron.training.trainer import train

    def run(overrides):
        return [{k: h[k] for k in KEYS} for h in train(config_from_dict(values, overrides))]

    result = {"reference": run(["parallel.tensor=2", "parallel.pipeline=2", f"checkpoint.dir={root}/ref",
                                "logging.run_name=ref"])}
    error = [None]
    if dist.get_rank() == 0:
        try:
            for name, (tp, pp, dp) in TARGETS.items():
                if reshard_main(["--checkpoint", f"{root}/ref/iter_0000003", "--tensor", str(tp), "--pipeline", str(pp),
                                 "--data-parallel", str(dp), "--out", f"{root}/{name}"]) != 0:
                    raise RuntimeError(f"fpa-reshard failed for {name}")
        except BaseException as err:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            error[0] = repr(err)
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise RuntimeError(error[0])
    for name, (tp, pp, _) in TARGETS.items():  # the overrides the tool prints (the divisor keeps the padding)
        divisor = load_config(f"{root}/{name}/iter_0000003/config.yaml").model.make_vocab_size_divisible_by
        result[name] = run([f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"checkpoint.resume={root}/{name}",
                            f"model.make_vocab_size_divisible_by={divisor}", f"checkpoint.dir={root}/{name}_run",
                            f"logging.run_name={name}"])
    return result


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    values = {**BASE, "logging": {**BASE["logging"], "dir": str(root / "logs")}}
    ranks = run_distributed(_session, 4, values, str(root))
    return ranks, root


def _close(mine: float, ref: float, rel: float = 1e-4) -> bool:
    return math.isfinite(mine) and math.isfinite(ref) and abs(mine - ref) <= rel * abs(ref)


@pytest.mark.parametrize("target", list(TARGETS))
def test_resumed_steps_equal_the_original_layout(session, target):
    ranks, _ = session
    reference, resumed = ranks[0]["reference"], ranks[0][target]
    assert [h["step"] for h in reference] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in resumed] == [4, 5, 6]
    for mine, ref in zip(resumed, reference[3:]):
        for key in ("lm_loss", "penalty", "grad_norm"):
            assert _close(mine[key], ref[key]), (target, key, mine, ref)
        assert mine["lambda"] == ref["lambda"] and mine["lr"] == ref["lr"], (mine, ref)
    # the continued run keeps learning: the optimizer state came along (a fresh AdamW would jump)
    assert reference[5]["lm_loss"] < reference[0]["lm_loss"]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("target", list(TARGETS))
def test_written_files_are_those_deepspeed_writes(session, target):
    """Our step-3 files against DeepSpeed's own step-6 files of the resumed run in the same layout."""
    _, root = session
    ours, theirs = root / target / "iter_0000003", root / f"{target}_run" / "iter_0000006"
    names = {p.name for p in theirs.iterdir() if not p.name.startswith("rng_rank_")}
    assert {p.name for p in ours.iterdir()} == names | {"resharded.json"}
    for model_file in sorted(ours.glob("mp_rank_*_model_states.pt")):
        a, b = _load(model_file), _load(theirs / model_file.name)
        assert set(a) == set(b)
        assert {k: getattr(v, "shape", v) for k, v in a["module"].items()} == \
               {k: getattr(v, "shape", v) for k, v in b["module"].items()}
        assert a["param_shapes"] == b["param_shapes"]
        for key in ("dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config"):
            assert a[key] == b[key], key
    trainer = torch.load(ours / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert trainer["step"] == 3 and trainer["consumed_samples"] == 24
    for zero_file in sorted(ours.glob("zero_pp_rank_*_optim_states.pt")):
        a, b = _load(zero_file)["optimizer_state_dict"], _load(theirs / zero_file.name)["optimizer_state_dict"]
        assert set(a) == set(b)
        for key in ("group_paddings", "param_alignment_paddings", "partition_count", "param_slice_mappings",
                    "zero_stage", "clip_grad"):
            assert a[key] == b[key], key
        assert [t.shape for t in a["single_partition_of_fp32_groups"]] == \
               [t.shape for t in b["single_partition_of_fp32_groups"]]
        sa, sb = a["base_optimizer_state"], b["base_optimizer_state"]
        assert {g: {k: v.shape for k, v in s.items()} for g, s in sa["state"].items()} == \
               {g: {k: v.shape for k, v in s.items()} for g, s in sb["state"].items()}
        assert [set(g) for g in sa["param_groups"]] == [set(g) for g in sb["param_groups"]]
        assert all(float(s["step"]) == 3.0 for s in sa["state"].values())


def _tensors(iter_dir) -> dict:
    """Every tensor of a checkpoint's DeepSpeed files, keyed by file and path inside it."""
    out = {}
    for f in sorted(iter_dir.glob("*.pt")):
        if f.name.startswith("rng_rank_"):
            continue
        sd = _load(f)
        if "module" in sd:
            out.update({(f.name, "module", k): v for k, v in sd["module"].items() if torch.is_tensor(v)})
        if "optimizer_state_dict" in sd:
            osd = sd["optimizer_state_dict"]
            out.update({(f.name, "fp32", g): t for g, t in enumerate(osd["single_partition_of_fp32_groups"])})
            for g, state in osd["base_optimizer_state"]["state"].items():
                out.update({(f.name, key, g): t for key, t in state.items()})
            out[(f.name, "mappings")] = osd["param_slice_mappings"]
    return out


def test_round_trip_through_dp2_gives_back_every_tensor(session, tmp_path):
    """TP2 x PP2 x DP1 -> TP1 x PP2 x DP2 (fixture) -> TP2 x PP2 x DP1: the same bits, optimizer included."""
    from fpa_megatron.checkpoint.reshard import reshard

    _, root = session
    back = reshard(root / "tp1pp2dp2", tmp_path / "back", tensor=2, pipeline=2, log=lambda _: None)
    original, again = _tensors(root / "ref" / "iter_0000003"), _tensors(back)
    assert set(original) == set(again)
    for key, value in original.items():
        if torch.is_tensor(value):
            assert value.dtype == again[key].dtype and torch.equal(value, again[key]), key
        else:
            assert value == again[key], key
    assert any(k[1] == "exp_avg" and v.abs().sum() > 0 for k, v in original.items())  # real moments were compared


def test_vocabulary_padding_is_kept(session):
    """At TP 1 the default padding (128) would drop 128 of the 256 rows TP 2 trained; the tool keeps them."""
    from fpa_megatron.config import load_config
    from fpa_megatron.rules import padded_vocab_size

    _, root = session
    assert padded_vocab_size(100, 1) == 128 and padded_vocab_size(100, 2) == 256
    for target, (tp, _, _) in TARGETS.items():
        cfg = load_config(root / target / "iter_0000003" / "config.yaml")
        assert (cfg.parallel.tensor, cfg.parallel.pipeline) == TARGETS[target][:2]
        assert cfg.model.make_vocab_size_divisible_by == (256 if tp == 1 else 128)  # unchanged where it fits
        assert padded_vocab_size(100, tp, cfg.model.make_vocab_size_divisible_by) == 256
        module = _load(root / target / "iter_0000003" / "mp_rank_00_model_states.pt")["module"]
        assert module["embedding.word_embeddings.weight"].shape[0] == 256 // tp


# ------------------------------------------------------------------------------------------ bad input


def _cli(args: list, capsys) -> tuple[int, str]:
    from fpa_megatron.checkpoint.cli import reshard_main as main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--tensor", "3", "--pipeline", "1", "--world-size", "3"], "model.num_attention_heads=4 is not divisible by "
                                                                 "parallel.tensor=3"),
    (["--tensor", "1", "--pipeline", "3", "--world-size", "3"], "model.num_layers=4 is not divisible by "
                                                                 "parallel.pipeline=3"),
    (["--tensor", "1", "--pipeline", "1", "--world-size", "3"], "train.global_batch_size=8 is not divisible"),
    (["--tensor", "2", "--pipeline", "2", "--world-size", "6"], "world size 6 is not divisible by TP 2 x PP 2"),
], ids=["heads", "layers", "batch", "world"])
def test_layout_not_valid_for_the_model(session, tmp_path, capsys, args, message):
    _, root = session
    code, err = _cli(["--checkpoint", root / "ref", "--out", tmp_path / "out"] + args, capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint_and_existing_output(session, tmp_path, capsys):
    _, root = session
    copy = tmp_path / "ckpt" / "iter_0000003"
    shutil.copytree(root / "ref" / "iter_0000003", copy)
    (copy / "complete").unlink()
    code, err = _cli(["--checkpoint", copy, "--tensor", "1", "--pipeline", "1", "--out", tmp_path / "a"], capsys)
    assert code == 2 and "is incomplete (no 'complete' marker" in err, err
    code, err = _cli(["--checkpoint", tmp_path / "ckpt", "--tensor", "1", "--pipeline", "1", "--out", tmp_path / "a"],
                     capsys)
    assert code == 2 and "no complete checkpoint" in err, err
    (copy / "complete").write_text("3\n")
    (copy / "mp_rank_02_model_states.pt").unlink()
    code, err = _cli(["--checkpoint", copy, "--tensor", "1", "--pipeline", "1", "--out", tmp_path / "a"], capsys)
    assert code == 2 and "mp_rank_02_model_states.pt' is missing" in err, err
    code, err = _cli(["--checkpoint", root / "ref", "--tensor", "1", "--pipeline", "1", "--out", root / "tp1pp1dp4"],
                     capsys)
    assert code == 2 and "already exists" in err, err


def test_missing_optimizer_state_needs_explicit_reset(session, tmp_path, capsys):
    """Without the ZeRO files the tool refuses and names --reset-optimizer; with it, the weights move and AdamW
    restarts (moments 0, step 0), never silently."""
    _, root = session
    copy = tmp_path / "ckpt" / "iter_0000003"
    shutil.copytree(root / "ref" / "iter_0000003", copy)
    for f in copy.glob("zero_pp_rank_*"):
        f.unlink()
    args = ["--checkpoint", copy, "--tensor", "1", "--pipeline", "2", "--data-parallel", "2"]
    code, err = _cli(args + ["--out", tmp_path / "a"], capsys)
    assert code == 2 and "--reset-optimizer" in err and "no ZeRO optimizer file" in err, err
    assert not (tmp_path / "a").exists()
    code, _ = _cli(args + ["--out", tmp_path / "b", "--reset-optimizer"], capsys)
    assert code == 0
    fresh, carried = _tensors(tmp_path / "b" / "iter_0000003"), _tensors(root / "tp1pp2dp2" / "iter_0000003")
    assert set(fresh) == set(carried)
    for key, value in fresh.items():
        if key[1] in ("module", "fp32"):  # fp32 training: the master weights are the weights
            assert torch.equal(value, carried[key]), key
        elif key[1] in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.count_nonzero(value) == 0 and torch.count_nonzero(carried[key]) > 0, key


def test_vocab_divisor_is_a_checked_config_key():
    """model.make_vocab_size_divisible_by (Megatron-LM's knob): rejected when < 1, used for the padded size."""
    from fpa_megatron.config import ConfigError, config_from_dict
    from fpa_megatron.preflight import check_config

    values = {**BASE, "model": {**MODEL, "vocab_size": 300}}
    assert check_config(config_from_dict(values), 1).padded_vocab_size == 384
    assert check_config(config_from_dict(values, ["model.make_vocab_size_divisible_by=512"]), 1).padded_vocab_size == 512
    with pytest.raises(ConfigError, match="model.make_vocab_size_divisible_by=0"):
        check_config(config_from_dict(values, ["model.make_vocab_size_divisible_by=0"]), 1)
