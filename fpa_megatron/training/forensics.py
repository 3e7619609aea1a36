"""What a bad step trained on: a skipped or rolled-back step writes its samples to the run directory, and
`data.exclude_samples` leaves them out of a rerun.

`<run dir>/forensics/step_<N>.json` (rank 0): the step, why its update was not kept (a non-finite loss or
gradient, a loss spike and the policy's action), its LM loss, and for every sample of its global batch the global
sample index, the dataset (the prefix of the blend it came from, or "mock") and the document ids the sample's
tokens come from. Listing the file (or the indices) in `data.exclude_samples` takes those samples out of the
training order (`data.datasets.SampleOrder`): a rerun from a checkpoint before them trains on the next samples
instead, and every other sample keeps its place.
"""

from __future__ import annotations

import json

from fpa_megatron.config import RunConfig, run_dir
from fpa_megatron.data.mixture import SampleOrder
from fpa_megatron.run_log import get_logger
from fpa_megatron.training.guard import UPDATE, Verdict

log = get_logger("forensics")


def describe_sample(dataset, index: int) -> dict:
    """{"sample", "dataset", "documents"} of one global training sample (a Megatron blend or one GPTDataset)."""
    source, inner = index, dataset
    if hasattr(dataset, "dataset_index"):  # BlendedDataset: which dataset of the blend, and its sample
        inner = dataset.datasets[int(dataset.dataset_index[index])]
        source = int(dataset.dataset_sample_index[index])
    shuffled = int(inner.shuffle_index[source])
    first_doc, last_doc = int(inner.sample_index[shuffled][0]), int(inner.sample_index[shuffled + 1][0])
    documents = [int(d) for d in inner.document_index[first_doc:last_doc + 1]]
    return {"sample": index, "dataset": inner.dataset_path or "mock", "documents": documents}


class SpikeForensics:
    def __init__(self, cfg: RunConfig, order: SampleOrder, train_ds, rank: int):
        self.dir = run_dir(cfg) / "forensics"
        self.order, self.train_ds, self.rank = order, train_ds, rank

    def after_verdict(self, step: int, verdict: Verdict, lm_loss: float, first_position: int,
                      global_batch_size: int) -> None:
        """Rank 0 writes the step's samples when its update was not kept (skipped, rolled back, stopped)."""
        if self.rank != 0 or (verdict.action == UPDATE and not verdict.spike):
            return
        why = "non-finite loss or gradient" if verdict.nonfinite else f"loss spike ({verdict.action})"
        samples = [describe_sample(self.train_ds, i) for i in self.order.samples(first_position, global_batch_size)]
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:07d}.json"
        path.write_text(json.dumps({"step": step, "reason": why, "lm_loss": lm_loss, "samples": samples}, indent=1)
                        + "\n")
        log.warning(f"step {step}: its {len(samples)} samples are in {path}; data.exclude_samples=[{path}] leaves "
                    f"them out of a rerun")
