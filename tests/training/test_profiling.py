"""`profiling.*`: the chosen steps traced with torch.profiler on the chosen ranks, the project's named ranges in
the trace (read back from the Chrome trace JSON), the TensorBoard plugin's files and the CPU memory profile."""

from __future__ import annotations

import json

import pytest

from fpa_megatron.testing import run_distributed
from tests.training.test_trainer import BASE, train_rank


def _trace_names(path) -> set[str]:
    return {event.get("name", "") for event in json.loads(path.read_text())["traceEvents"]}


@pytest.mark.parametrize("overrides,ranges", [
    (["parallel.pipeline=2", "checkpoint.interval=2"],
     {"fpa/forward_backward", "fpa/attention/blockwise", "fpa/penalty_reduce", "fpa/optimizer_step",
      "fpa/checkpoint_save"}),
    (["parallel.context=2"], {"fpa/attention/blockwise", "fpa/cp_kv_exchange", "fpa/cp_grad_scatter"}),
], ids=["pp2", "cp2"])
def test_the_chosen_steps_are_traced_with_the_named_ranges(tmp_path, overrides, ranges):
    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)}}
    profile = tmp_path / "w2" / "profile"
    run_distributed(train_rank, 2, values, overrides + [
        "logging.run_name=w2", "profiling.start_step=2", "profiling.steps=2", "profiling.ranks=[0,1]",
        "profiling.memory=true"])
    for rank in (0, 1):
        chrome = profile / f"rank{rank}_steps2-3.json"
        names = _trace_names(chrome)
        assert ranges <= names, (rank, ranges - names)
        if "parallel.pipeline=2" in overrides:  # the pipeline's p2p: the process group's own send/recv events
            assert any("send" in n for n in names) and any("recv" in n for n in names), sorted(names)[:40]
        assert "blockwise" in (profile / f"rank{rank}_cpu_memory.txt").read_text() or \
            "Self CPU Mem" in (profile / f"rank{rank}_cpu_memory.txt").read_text()
    board = sorted(p.name.split(".")[0] for p in (profile / "tensorboard").glob("*.pt.trace.json"))
    assert board == ["rank0", "rank1"], board  # one per traced rank, where the TensorBoard plugin reads them
    assert sorted(p.name for p in profile.glob("rank*_steps*.json")) == ["rank0_steps2-3.json", "rank1_steps2-3.json"]


def test_profiling_off_writes_nothing_and_bad_ranks_are_refused(tmp_path):
    from fpa_megatron.config import ConfigError, config_from_dict
    from fpa_megatron.rules import check_values

    values = {**BASE, "logging": {**BASE["logging"], "dir": str(tmp_path)}}
    run_distributed(train_rank, 1, values, ["logging.run_name=off", "train.steps=2"])
    assert not (tmp_path / "off" / "profile").exists()
    cfg = config_from_dict(values, ["profiling.start_step=1", "profiling.ranks=[0,2]"])
    with pytest.raises(ConfigError, match=r"profiling.ranks=\[0, 2\] must be a non-empty list of global ranks in "
                                          r"\[0, 2\)"):
        check_values(cfg, 2)
