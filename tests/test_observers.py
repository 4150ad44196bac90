import pytest
import torch

from pomq_deploy.quant.observers import RangeObserver


def feed(kind, *batches, per_channel=False):
    obs = RangeObserver(kind, per_channel=per_channel)
    for b in batches:
        obs.update(torch.tensor(b))
    return obs


def test_minmax():
    obs = feed("minmax", [[1.0, 2.0], [0.0, -0.5]], [[-3.0, 0.5], [1.0, 1.0]], per_channel=True)
    assert (float(obs.lo), float(obs.hi)) == (-3.0, 2.0)
    assert obs.lo_c.tolist() == [-3.0, -0.5] and obs.hi_c.tolist() == [1.0, 2.0]


def test_ema_momentum_0_01():
    obs = feed("ema", [0.0, 1.0], [-1.0, 3.0])
    assert float(obs.hi) == pytest.approx(1 + 0.01 * (3 - 1)) and float(obs.lo) == pytest.approx(-0.01)


def test_percentile_0_99999():
    obs = feed("percentile", torch.arange(100001.0).tolist())
    # 0.99999 of 100000 gaps is rank 99999; 0.00001 is rank 1
    assert (float(obs.lo), float(obs.hi)) == (1.0, 99999.0)


def test_percentile_is_smoothed_by_ema():
    obs = feed("percentile", [0.0] * 10 + [10.0], [0.0] * 10 + [20.0])
    assert float(obs.hi) == pytest.approx(10 + 0.01 * (20 - 10))


def test_omse_observer_tracks_minmax():
    obs = feed("omse", [0.0, 1.0], [-2.0, 0.5])
    assert (float(obs.lo), float(obs.hi)) == (-2.0, 1.0)


def test_unknown_kind():
    with pytest.raises(ValueError, match="allowed: minmax, ema, percentile, omse"):
        RangeObserver("kl")
