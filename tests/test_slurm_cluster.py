"""tests/slurm_cluster.py without a cluster: a missing SLURM skips the tests that need it, but fails them in CI."""

from __future__ import annotations

import pytest

from tests.slurm_cluster import skip_or_fail


def test_missing_slurm_skips_outside_ci_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="SLURM is not installed"):
        skip_or_fail("SLURM is not installed")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and SLURM is not installed"):
        skip_or_fail("SLURM is not installed")
