"""The acceptance predicted from the spread of SLMC log acceptance ratios (run summary)."""

import math

import torch

from torchmdx.lattice.run import log_ratio_statistics


def test_acceptance_from_log_ratio_spread_matches_gaussian_metropolis():
    # log ratios r ~ N(-s²/2, s²) (the mean that detailed balance fixes for a Gaussian spread):
    # the Metropolis acceptance E[min(1, e^r)] estimated directly must equal erfc(s / 2√2)
    g = torch.Generator().manual_seed(3)
    for s in (0.3, 1.0, 2.2):
        r = -0.5 * s * s + s * torch.randn(400_000, dtype=torch.float64, generator=g)
        direct = float(torch.exp(r).clamp(max=1.0).mean())
        stats = log_ratio_statistics(r.reshape(1000, 400))
        assert abs(stats["log_ratio_std"] - s) < 0.01 * s
        assert abs(stats["log_ratio_mean"] + 0.5 * s * s) < 0.02
        assert abs(stats["acceptance_from_log_ratio_std"] - direct) < 0.005, (s, direct, stats)
    # a spread of zero (a perfect effective model) is always accepted
    assert log_ratio_statistics(torch.zeros(10, 4))["acceptance_from_log_ratio_std"] == 1.0
    assert math.isnan(log_ratio_statistics(torch.zeros(1))["log_ratio_std"])
