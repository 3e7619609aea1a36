"""fpa-plan's command line: the table, the JSON, what is (not) listed, and clear errors for bad arguments."""

from __future__ import annotations

import json

import pytest

from fpa_megatron.config import config_from_dict
from fpa_megatron.planner.cli import main
from fpa_megatron.model.memory import GIB, Layout, step_memory

TINY = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4", "model.seq_length=1024",
        "model.vocab_size=1000", "model.max_position_embeddings=1024", "train.global_batch_size=8",
        "train.micro_batch_size=1"]


def run(capsys, *args):
    code = main(["configs/demo_cpu.yaml", *TINY, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_lists_only_layouts_that_fit_with_every_term(capsys):
    code, out, _ = run(capsys, "--gpus", "4", "--gpu-memory", "80", "--json")
    assert code == 0
    result = json.loads(out)
    names = [row["name"] for row in result["layouts"]]
    assert names and len(names) == len(set(names))
    for row in result["layouts"]:
        layout = Layout(**row["layout"])
        assert layout.gpus == 4
        mem = row["memory_bytes"]
        assert mem["total"] <= 80 * GIB
        terms = ("weights", "gradients", "master_fp32", "adam_moments", "fp32_gradient_partition", "activations")
        assert mem["tensors"] == sum(mem[k] for k in terms) and mem["total"] == mem["tensors"] + mem["margin"]
        t = row["time"]
        parts = ("compute_s", "bubble_s", "tp_comm_s", "cp_comm_s", "pp_comm_s", "dp_comm_s")
        assert t["step_s"] == pytest.approx(sum(t[k] for k in parts))
    steps = [row["time"]["step_s"] for row in result["layouts"]]
    assert steps == sorted(steps)  # fastest first
    # what config_checks rejects is counted, not offered (ZeRO-2 with a pipeline, here)
    assert result["rejected_by_config_checks"]["optimizer.zero_stage=2 is not supported with parallel.pipeline=2"]
    assert not any(r["layout"]["zero_stage"] == 2 and r["layout"]["pipeline"] > 1 for r in result["layouts"])


def test_a_layout_that_does_not_fit_is_not_listed(capsys):
    """With a memory limit between two layouts' totals, exactly the smaller ones are listed."""
    _, out, _ = run(capsys, "--gpus", "2", "--gpu-memory", "80", "--json")
    totals = sorted(row["memory_bytes"]["total"] for row in json.loads(out)["layouts"])
    limit = (totals[0] + totals[-1]) / 2 / GIB
    _, out, _ = run(capsys, "--gpus", "2", "--gpu-memory", str(limit), "--json")
    listed = json.loads(out)["layouts"]
    assert listed and len(listed) == sum(t <= limit * GIB for t in totals) < len(totals)
    assert all(row["memory_bytes"]["total"] <= limit * GIB for row in listed)


def test_no_layout_fits_exits_1(capsys):
    code, out, err = run(capsys, "--gpus", "2", "--gpu-memory", "0.5")
    assert code == 1 and "no layout fits in 0.5 GiB per GPU" in err
    assert out.startswith("0 of ")


def test_table_shows_the_terms_and_the_best_layout_first(capsys):
    code, out, _ = run(capsys, "--gpus", "4", "--gpu-memory", "80", "--top", "3")
    assert code == 0
    lines = out.splitlines()
    assert "layouts fit on 4 GPUs of 80 GiB" in lines[0]
    for column in ("weights", "grads", "master", "adam", "activ.", "margin", "total", "step s", "tok/s"):
        assert column in lines[1]
    assert len([line for line in lines if line.startswith("TP")]) == 3
    _, out_json, _ = run(capsys, "--gpus", "4", "--gpu-memory", "80", "--json")
    assert lines[2].startswith(json.loads(out_json)["layouts"][0]["name"])


def test_the_memory_terms_follow_the_layout():
    """Halving what ZeRO partitions and what TP splits: the terms move the way the layout says."""
    cfg = config_from_dict({"model": dict(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=1024,
                                          vocab_size=1024, dtype="bf16")})
    one = step_memory(cfg, Layout(data=1), 1024)
    dp4 = step_memory(cfg, Layout(data=4), 1024)
    assert dp4["master_fp32"] == one["master_fp32"] // 4 and dp4["weights"] == one["weights"]
    tp2 = step_memory(cfg, Layout(tensor=2), 1024)
    tp2_sp = step_memory(cfg, Layout(tensor=2, sequence_parallel=True), 1024)
    assert tp2_sp["activations"] < tp2["activations"] < one["activations"]
    full = step_memory(cfg, Layout(recompute="full"), 1024)
    assert full["activations"] < one["activations"]


@pytest.mark.parametrize("args,message", [
    (["--gpus", "0", "--gpu-memory", "80"], "--gpus: expected a positive int, got '0'"),
    (["--gpus", "4", "--gpu-memory", "lots"], "--gpu-memory: expected a positive float, got 'lots'"),
    (["--gpus", "4", "--gpu-memory", "80", "--mfu", "1.5"], "--mfu: expected a fraction in (0, 1], got '1.5'"),
    (["--gpus", "4", "--gpu-memory", "80", "--link-gbps", "3600"], "expected INTRA,INTER"),
    (["--gpus", "4"], "the following arguments are required: --gpu-memory"),
    (["--gpus", "3", "--gpu-memory", "80", "model.recompute=sometimes"], "model.recompute='sometimes'"),
    (["--gpus", "4", "--gpu-memory", "80", "model.hidden_sizes=3"], "model.hidden_sizes: unknown key"),
])
def test_bad_arguments_are_clear_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["configs/demo_cpu.yaml", *TINY, *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_config_file(capsys):
    with pytest.raises(SystemExit):
        main(["configs/nope.yaml", "--gpus", "1", "--gpu-memory", "80"])
    assert "config file 'configs/nope.yaml' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("preset,gpus", [("gpt_125m", 8), ("gpt_1.3b", 8), ("gpt_7b", 8)])
def test_preset_headers_quote_their_plan(preset, gpus):
    """The memory a preset's header quotes for its own layout is what the planner computes for it."""
    import re
    from pathlib import Path

    from fpa_megatron.config import load_config
    from fpa_megatron.planner.search import own_layout, planning_config

    path = Path(__file__).resolve().parents[2] / "configs" / f"{preset}.yaml"
    header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    quoted = re.search(r"holds ([\d.]+) GiB of tensors per GPU \(activations ([\d.]+)\), ([\d.]+) GiB with", header)
    assert quoted, header
    cfg = load_config(path)
    layout, vocab = own_layout(cfg, gpus)
    memory = step_memory(planning_config(cfg), layout, vocab)
    assert [float(x) for x in quoted.groups()] == [round(memory[k] / GIB, 1)
                                                   for k in ("tensors", "activations", "total")]


def test_step_time_terms():
    """Compute at the stated MFU, the bubble (p-1)/(m v), and links chosen by the groups' span."""
    from dataclasses import replace

    from fpa_megatron.flops import flops_per_token
    from fpa_megatron.planner.time import Hardware, step_time

    cfg = config_from_dict({"model": dict(num_layers=8, hidden_size=256, num_attention_heads=4, seq_length=1024,
                                          vocab_size=1024, dtype="bf16"),
                            "train": dict(global_batch_size=64, micro_batch_size=1)})
    hw = Hardware(tflops=100.0, mfu=0.5, intra_gbps=800.0, inter_gbps=100.0)
    base = step_time(cfg, Layout(data=8, num_microbatches=8), 1024, 10**6, hw)
    flops = 64 * 1024 * flops_per_token(cfg.model, 1024, causal=True) / 8
    assert base["compute_s"] == pytest.approx(flops / (100e12 * 0.5))
    assert base["bubble_s"] == 0 and base["tp_comm_s"] == 0
    pp4 = step_time(cfg, Layout(pipeline=4, data=2, num_microbatches=32), 1024, 10**6, hw)
    assert pp4["bubble_s"] == pytest.approx(pp4["compute_s"] * 3 / 32)
    vp2 = step_time(cfg, Layout(pipeline=4, virtual_pipeline=2, data=2, num_microbatches=32), 1024, 10**6, hw)
    assert vp2["bubble_s"] == pytest.approx(pp4["bubble_s"] / 2)
    # DP over 8 GPUs stays in the node (intra link); over 16 it crosses nodes (inter link)
    faster_inter = replace(hw, inter_gbps=200.0)
    assert step_time(cfg, Layout(data=8, num_microbatches=8), 1024, 10**6, faster_inter)["dp_comm_s"] == \
        base["dp_comm_s"] == pytest.approx(2 * 7 / 8 * 2e6 / (800e9 / 8))
    dp16 = Layout(data=16, num_microbatches=4)
    assert step_time(cfg, dp16, 1024, 10**6, faster_inter)["dp_comm_s"] == pytest.approx(
        step_time(cfg, dp16, 1024, 10**6, hw)["dp_comm_s"] / 2)
    tp2 = step_time(cfg, Layout(tensor=2, data=4, num_microbatches=16), 1024, 10**6, hw)
    # 8 layers x 16 micro-batches x (fwd, bwd) x 2 all-reduces of s*b*h bf16, ring over 2 ranks, intra link
    assert tp2["tp_comm_s"] == pytest.approx(8 * 16 * 2 * 2 * (2 * 1 / 2 * 1024 * 256 * 2) / (800e9 / 8))
