import math

import pytest

from fpa_megatron.schedules import LambdaSchedule


def test_values_follow_lambda0_gamma_power_t():
    sched = LambdaSchedule(lambda0=0.5, gamma=0.9)
    seen = []
    for _ in range(6):
        seen.append(sched.value())
        sched.advance()
    assert seen == pytest.approx([0.5, 0.45, 0.405, 0.3645, 0.32805, 0.295245], rel=1e-12)
    assert sched.value(100) == pytest.approx(0.5 * math.pow(0.9, 100), rel=1e-12)


def test_gamma_one_is_constant_and_min_lambda_cuts_off():
    assert LambdaSchedule(0.1, 1.0).value(10_000) == 0.1
    sched = LambdaSchedule(lambda0=1.0, gamma=0.5, min_lambda=0.2)
    assert [sched.active(t) for t in range(5)] == [True, True, True, False, False]  # 1, .5, .25, .125, .0625
    assert not LambdaSchedule(0.0, 0.9).active(0)
    assert not LambdaSchedule(1.0, 0.9, enabled=False).active(0)
    assert LambdaSchedule(1.0, 0.9, enabled=False).value(0) == 0.0


@pytest.mark.parametrize("kwargs,key", [
    (dict(lambda0=-1.0, gamma=0.9), "lambda0"), (dict(lambda0=1.0, gamma=0.0), "gamma"),
    (dict(lambda0=1.0, gamma=1.5), "gamma"), (dict(lambda0=1.0, gamma=0.9, min_lambda=-0.1), "min_lambda"),
    (dict(lambda0=float("nan"), gamma=0.9), "lambda0"),
])
def test_rejects_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LambdaSchedule(**kwargs)


def test_state_round_trip():
    a = LambdaSchedule(0.3, 0.99, 1e-4)
    for _ in range(7):
        a.advance()
    b = LambdaSchedule(0.3, 0.99, 1e-4)
    b.load_state_dict(a.state_dict())
    assert b.step == 7 and b.value() == a.value() and b.value() == pytest.approx(0.3 * 0.99**7)
    with pytest.raises(ValueError, match="gamma"):
        LambdaSchedule(0.3, 0.9, 1e-4).load_state_dict(a.state_dict())
