"""`run_distributed` reports the warnings of its ranks to the caller and applies the caller's filters in them."""

from __future__ import annotations

import warnings

import pytest

from fpa_megatron.testing import run_distributed


def warning_rank(message: str) -> int:
    import torch.distributed as dist

    warnings.warn(message, UserWarning)
    return dist.get_rank()


def test_a_rank_warning_reaches_the_caller():
    with pytest.warns(UserWarning, match="shown by a rank"):
        assert run_distributed(warning_rank, 1, "shown by a rank") == [0]


@pytest.mark.filterwarnings("error:made an error by the caller's filter")
def test_the_callers_filters_apply_in_the_ranks():
    with pytest.raises(RuntimeError, match="rank 0 failed(.|\n)*UserWarning: made an error by the caller's filter"):
        run_distributed(warning_rank, 1, "made an error by the caller's filter")
