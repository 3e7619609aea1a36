"""The interleaved pipeline (PP2 x VP2: 2 model chunks per stage, 8 layers) trains what one process trains.

Two spawns (module fixture): one process trains the reference (tied and untied embeddings, 8 steps, a
checkpoint at step 4); `fpa-reshard` rewrites that step-4 checkpoint for PP2 x VP2; two gloo ranks train the same
runs at PP2 x VP2 through `train(cfg)`, stop one at step 4 and resume it, resume the resharded reference,
compute the first step's gradients on the model `train` builds, and continue the VP step-4 checkpoint resharded
to PP1 (x DP2). Per-layer penalties come back from TensorBoard's files, the exports from safetensors.
"""

from __future__ import annotations

import math

import pytest
import torch

from fpa_megatron.testing import run_distributed
from tests.model import test_layout_equivalence as equivalence
from tests.training.test_trainer import BASE, KEYS, _assert_same_steps

LAYERS = 8
VP = ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]
EMBEDDINGS = {"tied": [], "untied": ["model.tie_embeddings=false"]}
# init_std 0.2: attention sharp enough that the layers' penalties differ (a misplaced chunk would show)
COMMON = ["model.init_std=0.2", "train.steps=8", "logging.tensorboard=true", "logging.attention_stats_interval=4",
          "train.eval_interval=4", "train.eval_iters=1"]
DIAGNOSTICS = ("val_loss", "attention/collision", "attention/entropy", "attention/max_logit")
REPORTED = KEYS + DIAGNOSTICS


def _values(root: str) -> dict:
    return {**BASE, "model": {**BASE["model"], "num_layers": LAYERS}, "logging": {**BASE["logging"], "dir": root}}


def _train(values: dict, overrides: list[str]) -> list[dict]:
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    history = train(config_from_dict(values, COMMON + overrides))
    return [{k: h[k] for k in REPORTED + ("step",) if k in h} for h in history]


def _first_step_gradients(values: dict, overrides: list[str]) -> dict:
    """The gradients, loss and [L, H] penalty of one step on the model `train` builds (seeded global init), for
    the layout-equivalence batches (2 micro-batches); every rank returns the global gradients."""
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.preflight import check_config
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel

    cfg = config_from_dict(values, overrides)
    layout = check_config(cfg, torch.distributed.get_world_size())
    init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.train.seed,
                        virtual_pipeline=cfg.parallel.virtual_pipeline)
    penalty = make_penalty(cfg.model, cfg.fpa)
    model = build_gpt_model(cfg.model, layout.padded_vocab_size, penalty, layout.ffn_hidden_size, seed=cfg.train.seed)
    return equivalence._run(model, penalty, 0.3)


def single_rank(values: dict, root: str) -> dict:
    out = {}
    for name, extra in EMBEDDINGS.items():
        out[name] = _train(values, extra + [f"logging.run_name=single_{name}", "checkpoint.interval=4",
                                            f"checkpoint.dir={root}/single_{name}/checkpoints"])
        out[f"grads_{name}"] = _first_step_gradients(values, extra)
    return out


def _live_weights(values: dict, overrides: list[str], path: str) -> dict:
    """A fresh model and engine loading checkpoint `path` through DeepSpeed: its weights in global names."""
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.preflight import check_config
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.parallel.weights import gather_global
    from fpa_megatron.checkpoint.checkpointer import Checkpointer
    from fpa_megatron.training.optimizer import build_engine

    cfg = config_from_dict(values, COMMON + overrides)
    layout = check_config(cfg, torch.distributed.get_world_size())
    init_model_parallel(1, 2, cfg.train.seed + 1, virtual_pipeline=2)  # weights come only from the file
    penalty = make_penalty(cfg.model, cfg.fpa)
    model = build_gpt_model(cfg.model, layout.padded_vocab_size, penalty, layout.ffn_hidden_size)
    engine = build_engine(model, cfg.optimizer, cfg.model.dtype, cfg.train.micro_batch_size, layout.num_microbatches)
    Checkpointer(cfg, root=f"{path}/..").load(path, engine)
    return gather_global(model, {n: p.detach() for n, p in model.named_parameters()})


def vp_rank(values: dict, root: str) -> dict:
    from fpa_megatron.checkpoint.reshard import reshard

    ckpt = lambda name: [f"checkpoint.dir={root}/{name}", f"logging.run_name={name}"]  # noqa: E731
    out = {}
    for name, extra in EMBEDDINGS.items():
        out[name] = _train(values, VP + extra + ckpt(f"vp_{name}") + ["checkpoint.interval=4"])
        out[f"grads_{name}"] = _first_step_gradients(values, VP + extra)
    out["live_weights"] = _live_weights(values, VP + ckpt("vp_tied"), f"{root}/vp_tied/iter_0000008")
    resumed = VP + ckpt("vp_resumed") + ["checkpoint.resume=auto"]
    out["resumed"] = _train(values, resumed + ["train.exit_interval=4"]) + _train(values, resumed)
    out["from_single"] = _train(values, VP + ckpt("vp_from_single") + [f"checkpoint.resume={root}/single_as_vp"])
    error = [None]
    if torch.distributed.get_rank() == 0:
        try:
            reshard(f"{root}/vp_tied/iter_0000004", f"{root}/vp_as_pp1", tensor=1, pipeline=1, world_size=2,
                    log=lambda _: None)
        except BaseException as err:  # noqa: BLE001 - every rank must learn of it, or the other waits forever
            error[0] = repr(err)
    torch.distributed.broadcast_object_list(error, src=0)
    assert error[0] is None, error[0]
    out["pp1"] = _train(values, ckpt("pp1_from_vp") + [f"checkpoint.resume={root}/vp_as_pp1"])  # PP1 x DP2
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fpa_megatron.checkpoint.cli import reshard_main as reshard_main

    root = str(tmp_path_factory.mktemp("vpp"))
    values = _values(root)
    single = run_distributed(single_rank, 1, values, root)[0]
    assert reshard_main(["--checkpoint", f"{root}/single_tied/checkpoints/iter_0000004", "--tensor", "1", "--pipeline",
                         "2", "--virtual-pipeline", "2", "--world-size", "2", "--out", f"{root}/single_as_vp"]) == 0
    vp = run_distributed(vp_rank, 2, values, root)
    return {"root": root, "single": single, "vp": vp}


def _close(mine: float, ref: float, rel: float = 1e-5) -> bool:
    return math.isfinite(ref) and abs(mine - ref) <= rel * abs(ref)


def _assert_close_steps(got: list[dict], ref: list[dict], rel: float = 1e-5, skip: tuple = ()) -> None:
    """Loss, penalty, grad norm, lambda and lr within `rel`; validation loss and the attention diagnostics (a max
    logit near 0.06 after updates that Adam scales up where gradients are tiny) within 1e-4."""
    assert [h["step"] for h in got] == [h["step"] for h in ref]
    for mine, want in zip(got, ref):
        assert set(mine) == set(want), (mine, want)
        for key in want:
            if key != "step" and key not in skip:
                assert _close(mine[key], want[key], 1e-4 if key in DIAGNOSTICS else rel), (key, mine, want)


def _layer_penalties(run_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = sorted(t for t in events.Tags()["scalars"] if t.startswith("penalty/layer_"))
    return {tag: [e.value for e in events.Scalars(tag)] for tag in tags}


@pytest.mark.parametrize("embeddings", list(EMBEDDINGS))
def test_pp2_vp2_trains_like_one_process(runs, embeddings):
    single, vp = runs["single"][embeddings], runs["vp"]
    for rank_history in (vp[0][embeddings], vp[1][embeddings]):  # every rank reports the reduced values
        _assert_close_steps(rank_history, single)
    assert [h["step"] for h in single] == list(range(1, 9))
    assert {"val_loss", "attention/entropy"} <= set(single[3]) and single[-1]["lm_loss"] < single[0]["lm_loss"]
    # the per-layer penalties as logged (TensorBoard's own reader): the chunks' layers at their global index
    want = _layer_penalties(f"{runs['root']}/single_{embeddings}")
    got = _layer_penalties(f"{runs['root']}/vp_{embeddings}")
    assert sorted(want) == [f"penalty/layer_{i:02d}" for i in range(LAYERS)] and sorted(got) == sorted(want)
    for tag, values in want.items():
        assert len(values) == 8 and all(_close(a, b, 1e-4) for a, b in zip(got[tag], values)), tag  # float32 files
    assert len({round(v[0], 3) for v in want.values()}) > 1  # the layers differ: a permutation would show


@pytest.mark.parametrize("embeddings", list(EMBEDDINGS))
def test_first_step_gradients_and_penalty_matrix(runs, embeddings):
    want = runs["single"][f"grads_{embeddings}"]
    assert want["matrix"].shape == (LAYERS, 4) and want["matrix"].gt(0).all()
    names = set(want["grads"])
    assert ("output_layer.weight" in names) == (embeddings == "untied")
    assert {f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in range(LAYERS)} <= names
    for rank in (0, 1):
        mine = runs["vp"][rank][f"grads_{embeddings}"]
        assert _close(mine["loss"], want["loss"]) and _close(mine["penalty"], want["penalty"])
        assert equivalence._rel(mine["matrix"], want["matrix"]) <= 1e-5
        assert set(mine["grads"]) == names
        for name, grad in want["grads"].items():
            assert equivalence._rel(mine["grads"][name], grad) <= 1e-5, name


def test_resume_continues_bitwise(runs):
    for rank in (0, 1):
        resumed, straight = runs["vp"][rank]["resumed"], runs["vp"][rank]["tied"]
        assert [h["step"] for h in resumed] == list(range(1, 9))
        _assert_same_steps(resumed, straight)


def test_layout_json_records_the_chunks(runs):
    import json

    layout = json.loads(open(f"{runs['root']}/vp_tied/iter_0000004/layout.json").read())
    assert (layout["pipeline"], layout["virtual_pipeline"], layout["world_size"]) == (2, 2, 2)


def test_reshard_between_pp1_and_vp_continues_equal(runs):
    """Steps 5-8 after resharding: the reference's checkpoint resumed at PP2 x VP2, and the VP checkpoint
    resumed at PP1 (x DP2), follow the run they came from."""
    single, vp = runs["single"]["tied"], runs["vp"][0]
    assert [h["step"] for h in vp["from_single"]] == [5, 6, 7, 8]
    _assert_close_steps(vp["from_single"], single[4:])
    assert [h["step"] for h in vp["pp1"]] == [5, 6, 7, 8]
    # the attention probe is each DP rank's first micro-batch: under DP2 another batch, so it is left out there
    _assert_close_steps(vp["pp1"], vp["tied"][4:], skip=DIAGNOSTICS[1:])


# Weights after 8 AdamW updates in two layouts: where a gradient is ~0 (the query bias: softmax is shift
# invariant) Adam's normalized update turns float32 rounding into ~1e-4 relative differences; a misplaced
# chunk or layer would differ by O(1).
TRAINED_WEIGHTS_REL = 1e-3


def test_checkpoint_reader_gives_the_live_weights(runs):
    """The VP checkpoint read offline in global names: bitwise what DeepSpeed loads into the chunks (Megatron's
    own layer offsets), and the one-process checkpoint of the same step up to training noise."""
    from fpa_megatron.checkpoint.reader import read_model_checkpoint

    live = runs["vp"][0]["live_weights"]
    mine = read_model_checkpoint(f"{runs['root']}/vp_tied/iter_0000008")
    assert mine.layout.virtual_pipeline == 2 and mine.step == 8
    assert set(mine.state_dict) == set(live) and len(live) > LAYERS * 8
    for name, tensor in live.items():
        assert torch.equal(mine.state_dict[name], tensor), name
    for embeddings in EMBEDDINGS:
        mine = read_model_checkpoint(f"{runs['root']}/vp_{embeddings}/iter_0000008")
        want = read_model_checkpoint(f"{runs['root']}/single_{embeddings}/checkpoints/iter_0000008")
        assert set(mine.state_dict) == set(want.state_dict)
        for name, tensor in want.state_dict.items():
            assert equivalence._rel(mine.state_dict[name], tensor) <= TRAINED_WEIGHTS_REL, name


def test_export_equals_the_pp1_export(runs, tmp_path):
    from safetensors.torch import load_file

    from fpa_megatron.export.cli import main as export_main

    root = runs["root"]
    assert export_main(["hf", "--checkpoint", f"{root}/vp_tied/iter_0000004", "--out", str(tmp_path / "vp")]) == 0
    assert export_main(["hf", "--checkpoint", f"{root}/vp_as_pp1", "--out", str(tmp_path / "pp1")]) == 0
    assert export_main(["hf", "--checkpoint", f"{root}/single_tied/checkpoints/iter_0000004",
                        "--out", str(tmp_path / "single")]) == 0
    vp, pp1, single = (load_file(tmp_path / d / "model.safetensors") for d in ("vp", "pp1", "single"))
    assert set(vp) == set(pp1) == set(single) and len(vp) > 8 * 4
    for name, tensor in pp1.items():
        assert torch.equal(vp[name], tensor), name  # the same weights, read from chunked and plain files
        assert equivalence._rel(vp[name], single[name]) <= TRAINED_WEIGHTS_REL, name


def test_offline_layer_numbering_is_megatrons():
    """The offsets the checkpoint tools use without process groups are Megatron's `get_transformer_layer_offset`."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from fpa_megatron.parallel.weights import layer_placement, uniform_layer_offset

    for layers, pipeline, virtual in [(8, 2, 2), (12, 2, 3), (16, 4, 2), (8, 4, 2)]:
        config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=1,
                                   pipeline_model_parallel_size=pipeline, virtual_pipeline_model_parallel_size=virtual,
                                   pipeline_dtype=torch.float32, cuda_graph_scope=[])
        per_chunk = layers // (pipeline * virtual)
        for stage in range(pipeline):
            for chunk in range(virtual):
                offset = uniform_layer_offset(layers, pipeline, virtual, stage, chunk)
                assert offset == get_transformer_layer_offset(config, vp_stage=chunk, pp_rank=stage)
                for local in range(per_chunk):
                    assert layer_placement(offset + local, layers, pipeline, virtual) == (stage, chunk, local)
    assert uniform_layer_offset(8, 2, 2, 0, 1) == 4 and uniform_layer_offset(8, 2, 2, 1, 0) == 2  # stage 0: 0,1,4,5


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.virtual_pipeline=2"], 1, "parallel.virtual_pipeline=2 needs parallel.pipeline > 1"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=3"], 2,
     "model.num_layers=8 is not divisible by parallel.pipeline * parallel.virtual_pipeline = 2 * 3 = 6"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.global_batch_size=6"], 2,
     "the interleaved schedule needs the micro-batches per step (train.global_batch_size / (train.micro_batch_size"
     " * data_parallel) = 3) to be a multiple of parallel.pipeline=2"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=0"], 2, "parallel.virtual_pipeline"),
])
def test_config_errors(overrides, world, message):
    from fpa_megatron.config import ConfigError, config_from_dict
    from fpa_megatron.preflight import check_config

    with pytest.raises(ConfigError) as err:
        check_config(config_from_dict(_values("/tmp/unused"), overrides), world)
    assert message in str(err.value)
    assert not torch.distributed.is_initialized()


def vp_layout_rank(values: dict, layout: list[str]) -> list[dict]:
    return _train(values, VP + layout + ["logging.run_name=vp_" + "_".join(layout), "logging.tensorboard=false"])


FOUR_RANK_LAYOUTS = {"dp2-zero1": ["optimizer.zero_stage=1"],
                     "tp2-sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"]}


@pytest.mark.parametrize("layout", list(FOUR_RANK_LAYOUTS.values()), ids=list(FOUR_RANK_LAYOUTS))
def test_pp2_vp2_on_four_ranks_trains_like_one_process(runs, layout):
    """PP2 x VP2 with DP2 (ZeRO-1 partitions over DP2, the chunks' gradients reduced per DP group) or with TP2 + SP
    (every chunk's layers split over TP, the SP norms' gradients summed over TP): the same 8 steps as the
    one-process reference on every rank, validation loss included. The attention diagnostics are left out
    under DP: each replica probes its own first micro-batch (by design)."""
    ranks = run_distributed(vp_layout_rank, 4, _values(runs["root"]), layout)
    skip = DIAGNOSTICS[1:] if "optimizer.zero_stage=1" in layout else ()
    for history in ranks:
        _assert_close_steps(history, runs["single"]["tied"], skip=skip)
