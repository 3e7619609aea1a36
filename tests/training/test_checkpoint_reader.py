"""The offline checkpoint reader against what DeepSpeed and Megatron hold on the 4 ranks that wrote it."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from tests.trained_runs import FAMILIES, GLOBAL, STEPS, probe_tokens, trained_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


def test_model_parallel_rank_order_is_megatrons(runs):
    from fpa_megatron.checkpoint.reader import model_parallel_coordinates

    expected = model_parallel_coordinates(2, 2)
    for run in runs["runs"].values():
        seen = {mp: (tp, pp) for mp, tp, pp in run["ranks"]}
        assert seen == expected
    assert expected == {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}


def test_split_table_matches_megatrons_attributes(runs):
    from fpa_megatron.parallel.weights import tensor_parallel_dim

    for run in runs["runs"].values():
        for split_dims in run["split_dims"]:
            for name, dim in split_dims.items():
                assert tensor_parallel_dim(name) == dim, name
    with pytest.raises(ValueError, match="self_attention.new_thing.weight"):
        tensor_parallel_dim("decoder.layers.0.self_attention.new_thing.weight")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reader_equals_the_live_model(runs, family):
    from fpa_megatron.checkpoint.reader import read_model_checkpoint

    run = runs["runs"][family]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = read_model_checkpoint(run["checkpoint"])
    assert not [w for w in caught if "tied embeddings" in str(w.message)]  # both stages' copies are equal
    assert (ckpt.layout.tensor, ckpt.layout.pipeline, ckpt.layout.data) == (2, 2, 1)
    assert ckpt.layout.world_size == 4
    assert ckpt.step == STEPS and ckpt.consumed_samples == STEPS * GLOBAL
    assert ckpt.lambda_schedule["step"] == STEPS and ckpt.lambda_schedule["lambda0"] == 0.05
    assert ckpt.config.model.activation == FAMILIES[family]["activation"]
    live = run["weights"]  # DeepSpeed's loader + gather_global on the 4 ranks
    assert set(ckpt.state_dict) == set(live)
    assert ("output_layer.weight" in live) == (not FAMILIES[family]["tie_embeddings"])
    for name, tensor in live.items():
        assert torch.equal(ckpt.state_dict[name], tensor), name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp1_pp1_model_from_the_reader_gives_the_same_logits(runs, family):
    from fpa_megatron.checkpoint.megatron_lm import megatron_lm
    from fpa_megatron.checkpoint.reader import read_model_checkpoint

    run = runs["runs"][family]
    with megatron_lm(read_model_checkpoint(run["checkpoint"])) as lm:
        logits = lm.logits(probe_tokens())
    reference = run["logits"]  # TP2 x PP2 through the pipeline schedule
    assert torch.isfinite(reference).all()
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_reader_accepts_run_and_root_dirs_and_rejects_incomplete(runs, tmp_path):
    from fpa_megatron.checkpoint.reader import CheckpointError, read_model_checkpoint, resolve_checkpoint_dir

    run = runs["runs"]["gpt2"]
    ckpt_dir = resolve_checkpoint_dir(run["checkpoint"])
    assert resolve_checkpoint_dir(ckpt_dir.parent) == ckpt_dir  # the checkpoint root
    assert resolve_checkpoint_dir(ckpt_dir.parent.parent) == ckpt_dir  # the run directory
    broken = tmp_path / "checkpoints" / ckpt_dir.name
    shutil.copytree(ckpt_dir, broken)
    (broken / "mp_rank_03_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_03_model_states.pt"):
        read_model_checkpoint(broken)
    (broken / "complete").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        read_model_checkpoint(broken)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        read_model_checkpoint(tmp_path)
