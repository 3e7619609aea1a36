"""One check for the config-error tests: the pure rules refuse `overrides` with one message holding every
fragment (the keys and values it must name)."""

from __future__ import annotations

import pytest

from fpa_megatron.config import ConfigError, config_from_dict
from fpa_megatron.rules import check_values


def assert_config_error(values: dict, overrides: list[str], world_size: int, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        check_values(config_from_dict(values, overrides), world_size)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
