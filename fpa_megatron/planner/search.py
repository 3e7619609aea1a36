"""Enumerate the layouts a config allows on N GPUs, keep those the config check accepts and that fit, rank by time."""

from __future__ import annotations

import copy
import dataclasses
import os

from fpa_megatron.config import ConfigError, RunConfig, config_from_dict, config_to_dict
from fpa_megatron.options import RECOMPUTE, ZERO_STAGES
from fpa_megatron.model.memory import GIB, Layout, step_memory
from fpa_megatron.planner.time import Hardware, step_time
from fpa_megatron.preflight import check_config
from fpa_megatron.rules import check_model

MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def planning_config(cfg: RunConfig) -> RunConfig:
    """The config as the planner checks it: data and checkpoints play no part in a layout (mock data, no
    resume); a tokenizer that is not there is dropped (then model.vocab_size must be set)."""
    plan = copy.deepcopy(cfg)
    plan.data.mock = True
    plan.checkpoint.resume = "none"
    if plan.data.tokenizer is not None and not os.path.isfile(plan.data.tokenizer):
        plan.data.tokenizer = None
    return plan


def candidate_layouts(cfg: RunConfig, gpus: int, gpus_per_node: int):
    """Every combination of TP (within a node), PP, VP, CP, DP, SP, ZeRO stage, recompute and micro-batch size
    whose sizes multiply to `gpus` (the config check decides later which of them the project runs)."""
    m = cfg.model
    for tp in _divisors(min(gpus, gpus_per_node)):
        for cp in _divisors(gpus // tp):
            for pp in _divisors(gpus // (tp * cp)):
                dp = gpus // (tp * cp * pp)
                if gpus % (tp * cp * pp):
                    continue
                layers_per_stage = m.num_layers // pp if m.num_layers % pp == 0 else 0
                for vp in ([1] + [v for v in _divisors(layers_per_stage) if v > 1] if pp > 1 else [1]):
                    for sp in ((False, True) if tp > 1 else (False,)):
                        for zero in ZERO_STAGES:
                            for recompute in RECOMPUTE:
                                for mbs in MICRO_BATCH_SIZES:
                                    per_step = mbs * dp
                                    if cfg.train.global_batch_size % per_step:
                                        continue
                                    yield Layout(tensor=tp, pipeline=pp, virtual_pipeline=vp, context=cp, data=dp,
                                                 sequence_parallel=sp, zero_stage=zero, recompute=recompute,
                                                 micro_batch_size=mbs,
                                                 num_microbatches=cfg.train.global_batch_size // per_step)


def plan(cfg: RunConfig, gpus: int, gpu_memory_gb: float, hw: Hardware) -> dict:
    """All accepted layouts with their memory and time terms; those that fit first, fastest first."""
    base = planning_config(cfg)
    check_model(base)  # the config's own options, before the layout keys are replaced by each candidate's
    rows, rejected = [], {}
    values = config_to_dict(base)
    checked: dict = {}  # the config check's verdict does not depend on the recompute mode: one check per the rest
    for layout in candidate_layouts(base, gpus, hw.gpus_per_node):
        key = dataclasses.replace(layout, recompute="none")
        if key not in checked:
            try:
                candidate = config_from_dict(values, key.overrides())
                checked[key] = (candidate, check_config(candidate, gpus))
            except ConfigError as err:
                checked[key] = str(err).split(":")[0]
        if isinstance(checked[key], str):
            rejected[checked[key]] = rejected.get(checked[key], 0) + 1
            continue
        candidate, resolved = checked[key]
        candidate = copy.copy(candidate)
        candidate.model = dataclasses.replace(candidate.model, recompute=layout.recompute)
        memory = step_memory(candidate, layout, resolved.padded_vocab_size)
        time = step_time(candidate, layout, resolved.padded_vocab_size, memory["parameters"], hw)
        rows.append({"layout": layout, "name": layout.name(), "memory": memory, "time": time,
                     "fits": memory["total"] <= gpu_memory_gb * GIB})
    # fastest first; among equally fast layouts the one with the most memory to spare
    rows.sort(key=lambda r: (not r["fits"], round(r["time"]["step_s"], 6), r["memory"]["total"]))
    return {"gpus": gpus, "gpu_memory_gb": gpu_memory_gb, "hardware": hw, "layouts": rows,
            "rejected_by_config_checks": rejected}


def own_layout(cfg: RunConfig, gpus: int) -> tuple[Layout, int]:
    """The layout cfg itself asks for on `gpus` GPUs (checked by the config check) and its padded vocabulary."""
    plan_cfg = planning_config(cfg)
    resolved = check_config(plan_cfg, gpus)
    p = cfg.parallel
    layout = Layout(tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline, context=p.context,
                    data=resolved.data_parallel, sequence_parallel=p.sequence_parallel,
                    zero_stage=cfg.optimizer.zero_stage, recompute=cfg.model.recompute,
                    micro_batch_size=cfg.train.micro_batch_size, num_microbatches=resolved.num_microbatches)
    return layout, resolved.padded_vocab_size
