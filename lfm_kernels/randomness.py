"""Rank-based dropout's parameters and the Philox seeds the kernels draw from torch's generator."""
import torch


def check_drop(drop):
    """Validate drop=(pmin, pmax) and return it as floats (None stays None)."""
    if drop is None:
        return None
    try:
        pmin, pmax = (float(p) for p in drop)
    except (TypeError, ValueError):
        raise ValueError(f"drop must be None or a pair (pmin, pmax), got {drop!r}") from None
    for p in (pmin, pmax):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop probabilities must lie in [0, 1), got {drop!r}")
    if pmin > pmax:
        raise ValueError(f"drop needs pmin <= pmax, got pmin={pmin} > pmax={pmax}")
    return pmin, pmax


def rank_drop_probs(k: int, pmin: float, pmax: float, device=None) -> torch.Tensor:
    """Drop probability per rank (0 = largest): pmax at rank 0 falling linearly to pmin at rank k-1.

    With k == 1 the single value gets the mean (pmin + pmax) / 2.
    """
    if k == 1:
        return torch.full((1,), (pmin + pmax) / 2, dtype=torch.float32, device=device)
    return torch.linspace(pmax, pmin, k, dtype=torch.float32, device=device)


def dropout_scale(pmin: float, pmax: float) -> float:
    """Survivors are scaled by 1 / (1 - mean p); the mean of a linear ramp is its midpoint."""
    return 1.0 / (1.0 - (pmin + pmax) / 2)


def draw_seed(device) -> torch.Tensor:
    """Philox (seed, offset) drawn from torch's generator, so torch.manual_seed reproduces a run.

    A tensor, not Python ints, so the draw stays inside a torch.compile graph.
    """
    return torch.randint(0, 2**31 - 1, (2,), device=device, dtype=torch.int64)
