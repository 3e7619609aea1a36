"""The training mixture across resumes: what each dataset of the blend gave, and a new mixture from there on.

Every checkpoint records, per dataset (prefix) of the blend, the samples it gave so far, the size its sample
order was built for and that order's length (`MixtureRecord.state_dict`, the `data_mixture` entry of
`trainer_state.pt`). A resume whose `data.prefixes` / `data.weights` differ from the recorded ones starts a new
mixture at the resume position (docs/data.md states the rule):

- each dataset keeps its own sample order (its Megatron `GPTDataset`, rebuilt with the recorded size: the same
  seed, split and size give the same order) and continues it after the samples it already gave; an added
  dataset starts its order at 0 (built for its weight over the run's samples, as Megatron's builder sizes it);
- which dataset gives the sample at each position from the resume on is Megatron's blending index
  (`helpers.build_blending_indices`, the one `BlendedDataset` uses) for the new weights;
- a dataset whose order holds fewer samples than the new weights ask of it for the rest of the run cannot be
  honoured without repeating samples: `ConfigError` naming it, before any process group (preflight).

An unchanged mixture resumes as before: Megatron's blend of the config, untouched; a mixture begun at an earlier
resume goes on as it began. A checkpoint without the record (an older version) resumes on Megatron's blend
too. Mock data has no mixture. `SampleOrder` (the training order without data.exclude_samples) lives here too:
the record counts from the global sample index of the data position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from fpa_megatron.config import ConfigError

STATE_KEY = "data_mixture"  # its entry in trainer_state.pt
SURPLUS = 0.005  # Megatron's mid_level_dataset_surplus: what its builder adds to each dataset's request


class SampleOrder:
    """The training order of the global sample indices: 0, 1, 2, ... without the excluded ones
    (`data.exclude_samples`, e.g. the samples of a loss spike). Position p of the order is what `consumed_samples`
    counts, so a resume under the same exclusions continues exactly; positions before the first excluded sample
    are those of the order without exclusions."""

    def __init__(self, exclude=()):
        self.excluded = sorted(set(int(i) for i in exclude))

    def sample(self, position: int) -> int:
        """The global sample index at `position` (O(excluded) per call: the list is short)."""
        index = position
        for excluded in self.excluded:
            if excluded > index:
                break
            index += 1
        return index

    def samples(self, start: int, count: int) -> list[int]:
        return [self.sample(p) for p in range(start, start + count)]


def normalized(weights: Optional[Sequence[float]], count: int) -> Optional[list[float]]:
    """Weights summing to 1, or None (by size); one prefix has no weights (Megatron's builder ignores them)."""
    if weights is None or count == 1:
        return None
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def blending_index(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's blend: the dataset of each position and its sample within that dataset (greedy on the weights,
    so the index of a shorter size is a prefix of a longer one's)."""
    from megatron.core.datasets import helpers  # here: preflight imports this module, and no Megatron

    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    if size:
        helpers.build_blending_indices(dataset_index, sample_index, np.asarray(weights, dtype=np.float64),
                                       len(weights), size, False)
    return dataset_index, sample_index


@dataclass
class Mixture:
    """One mixture of the run: `prefixes` blended by `weights` from global sample index `start` on, each dataset's
    order continuing after `given_at_start`. start 0: Megatron's blend of the config (`MegatronBlend`)."""

    prefixes: list[str]
    weights: Optional[list[float]]  # normalized; None: by size or one prefix
    start: int = 0
    given_at_start: Optional[list[int]] = None

    def same_blend(self, prefixes: Sequence[str], weights: Optional[Sequence[float]]) -> bool:
        mine, theirs = self.weights, normalized(weights, len(prefixes))
        return list(prefixes) == self.prefixes and (mine is None) == (theirs is None) and (
            mine is None or np.allclose(mine, theirs, rtol=1e-9, atol=0))


class MixedDataset(torch.utils.data.Dataset):
    """A mixture that started at a resume: global index g >= start is position g - start of the blending index,
    sample given_at_start[d] + k of dataset d's order. Our own class: Megatron's BlendedDataset starts every
    dataset's order at 0."""

    def __init__(self, mixture: Mixture, orders: list, total: int):
        self.mixture, self.datasets = mixture, orders
        self.dataset_index, self.dataset_sample_index = blending_index(mixture.weights or [1.0], total - mixture.start)
        self.config = orders[0].config  # what every dataset was built with (e.g. document masking: its EOD)

    def __len__(self) -> int:
        return self.mixture.start + len(self.dataset_index)

    def __getitem__(self, index: int) -> dict:
        position = int(index) - self.mixture.start
        if position < 0:
            raise IndexError(f"sample {index} comes before this mixture (it starts at {self.mixture.start})")
        d = int(self.dataset_index[position])
        return {"dataset_id": d,
                **self.datasets[d][self.mixture.given_at_start[d] + int(self.dataset_sample_index[position])]}


def orders_of(dataset) -> list:
    """The per-dataset sample orders of a training dataset (a blend's datasets, or the dataset itself)."""
    return list(dataset.datasets) if hasattr(dataset, "dataset_index") else [dataset]  # BlendedDataset, MixedDataset


def given_before(dataset, mixture: Mixture, index: int) -> list[int]:
    """Samples each dataset gave at global indices [0, index) (excluded samples count: they are passed over)."""
    count = len(mixture.prefixes)
    if isinstance(dataset, MixedDataset):
        counts = np.bincount(dataset.dataset_index[:max(0, index - mixture.start)], minlength=count)
        return [int(a + b) for a, b in zip(mixture.given_at_start, counts)]
    if hasattr(dataset, "dataset_index"):  # Megatron's BlendedDataset
        return [int(c) for c in np.bincount(dataset.dataset_index[:index], minlength=count)]
    return [int(index)]


class MixtureRecord:
    """The run's mixture and every dataset it ever drew from; `state_dict(consumed_samples)` is what a checkpoint
    records at that data position."""

    def __init__(self, mixture: Mixture, dataset, order: SampleOrder, retired: Optional[dict] = None):
        self.mixture, self.dataset, self.order = mixture, dataset, order
        self.retired = dict(retired or {})  # prefixes of earlier mixtures, not in this one: their saved entries

    def state_dict(self, consumed_samples: int) -> dict:
        index = self.order.sample(consumed_samples)  # the next global sample index to train on
        given = given_before(self.dataset, self.mixture, index)
        datasets = dict(self.retired)
        for prefix, dataset, count in zip(self.mixture.prefixes, orders_of(self.dataset), given):
            datasets[prefix] = {"given": count, "order_size": dataset.num_samples, "order_length": len(dataset)}
        return {"prefixes": list(self.mixture.prefixes), "weights": self.mixture.weights,
                "start": self.mixture.start, "given_at_start": self.mixture.given_at_start,
                "next_sample": int(index), "datasets": datasets}


def plan(saved: dict, prefixes: Sequence[str], weights: Optional[list[float]], start: int, total: int,
         run_samples: int) -> tuple[Mixture, list[Optional[int]], dict]:
    """The mixture from global sample index `start` on, with each dataset of `saved["datasets"]` continuing after
    its `given`: (mixture, each dataset's order size, the retired datasets' entries). `weights`: normalized (None
    for one prefix); `total`: the global sample indices the run needs (its samples and the excluded ones);
    `run_samples`: train.steps x global batch, what an added dataset's order is sized for. ConfigError if a
    dataset's order cannot give what the weights ask of it."""
    blend = weights or [1.0]
    entries = saved["datasets"]
    dataset_index, _ = blending_index(blend, max(0, total - start))
    needs = np.bincount(dataset_index, minlength=len(prefixes))
    given, sizes = [], []
    for i, (prefix, weight, need) in enumerate(zip(prefixes, blend, needs)):
        entry = entries.get(prefix)
        if entry is None:  # an added dataset: its order from 0, sized as Megatron's builder would size it
            given.append(0)
            sizes.append(max(int(need), int(math.ceil(math.ceil(run_samples * weight) * (1 + SURPLUS)))))
            continue
        left = int(entry["order_length"]) - int(entry["given"])
        if need > left:
            raise ConfigError(
                f"data.weights (normalized {[round(w, 4) for w in blend]}): data.prefixes[{i}]={prefix!r} would have "
                f"to give {int(need)} more samples for the rest of the run, but its sample order holds {left} it has "
                f"not given yet (of {entry['order_length']}): it is exhausted. Lower its weight, or give more data "
                f"under a new prefix")
        given.append(int(entry["given"]))
        sizes.append(entry["order_size"])
    retired = {p: e for p, e in entries.items() if p not in prefixes}
    return Mixture(list(prefixes), weights, start, given), sizes, retired


def planned(saved: Optional[dict], prefixes: Sequence[str], weights: Optional[Sequence[float]], order: SampleOrder,
            consumed_samples: int, run_samples: int) -> Optional[tuple[Mixture, list[Optional[int]], dict]]:
    """`plan` for a resume at `consumed_samples`, or None where Megatron's blend of the config applies (no record,
    or this blend since the run began). A changed blend starts a new mixture at the resume's sample index; an
    unchanged one whose mixture began at an earlier resume is planned again from where it began (the saved
    weights, so the blending index is the same). ConfigError if it cannot be honoured (what preflight checks)."""
    config = Mixture(list(prefixes), normalized(weights, len(prefixes)))
    same = saved is not None and config.same_blend(saved["prefixes"], saved["weights"])
    if saved is None or (same and saved["start"] == 0):
        return None
    total = run_samples + len(order.excluded)
    if same:
        began = {p: dict(e, given=g) for p, e, g in zip(saved["prefixes"], (saved["datasets"][p] for p in
                                                                          saved["prefixes"]), saved["given_at_start"])}
        entries = {**saved["datasets"], **began}
        return plan({"datasets": entries}, saved["prefixes"], saved["weights"], int(saved["start"]), total, run_samples)
    if weights is None and len(prefixes) > 1:
        raise ConfigError(f"data.prefixes={list(prefixes)} / data.weights=None differ from the mixture the "
                          f"checkpoint was trained on ({saved['prefixes']}, weights {saved['weights']}): a changed "
                          f"mixture needs explicit data.weights")
    return plan(saved, prefixes, config.weights, order.sample(consumed_samples), total, run_samples)


def resume(saved: Optional[dict], prefixes: Sequence[str], weights: Optional[Sequence[float]], train_ds,
           order: SampleOrder, consumed_samples: int, run_samples: int,
           build_order: Callable[[str, Optional[int]], object]) -> MixtureRecord:
    """The run's mixture at the data position `consumed_samples`: Megatron's blend of the config (`train_ds`)
    where `planned` says so, else a `MixedDataset` of the planned mixture. run_samples: train.steps x global
    batch; build_order(prefix, size): that dataset's GPTDataset order of the training split."""
    mix = planned(saved, prefixes, weights, order, consumed_samples, run_samples)
    if mix is None:
        retired = {p: e for p, e in saved["datasets"].items() if p not in prefixes} if saved else {}
        return MixtureRecord(Mixture(list(prefixes), normalized(weights, len(prefixes))), train_ds, order, retired)
    mixture, sizes, retired = mix
    orders = [build_order(prefix, size) for prefix, size in zip(mixture.prefixes, sizes)]
    for prefix, dataset in zip(mixture.prefixes, orders):
        entry = saved["datasets"].get(prefix)
        if entry is not None and len(dataset) != int(entry["order_length"]):
            raise RuntimeError(f"{prefix}: its sample order has {len(dataset)} samples, the checkpoint recorded "
                               f"{entry['order_length']}: the data or data.split/seq_length/seed changed")
    return MixtureRecord(mixture, MixedDataset(mixture, orders, run_samples + len(order.excluded)), order, retired)
