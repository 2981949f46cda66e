"""FedDIP schedules: cubic sparsity ramp and incremental regularisation strength."""

from __future__ import annotations


def _check_round(t: int, T: int) -> None:
    if T <= 0:
        raise ValueError(f"T must be positive, got {T}")
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")


def sparsity_schedule(t: int, T: int, s0: float, sp: float) -> float:
    """s_t = s_p + (s_0 - s_p) * (1 - t/T)^3, from s_0 at t = 0 to the target s_p at t >= T."""
    _check_round(t, T)
    for name, s in (("s0", s0), ("sp", sp)):
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {s}")
    frac = min(t, T) / T
    return sp + (s0 - sp) * (1.0 - frac) ** 3


def lambda_schedule(t: int, T: int, lambda_max: float, Q: int = 20, lambda_min: float = 5e-4) -> float:
    """Incremental regularisation: rounds [0, T) split into Q equal segments; segment 0 has
    lambda = 0, segments 1..Q-1 rise linearly from lambda_min to lambda_max. Rounds >= T stay in
    the last segment."""
    _check_round(t, T)
    if Q < 2:
        raise ValueError(f"Q must be >= 2, got {Q}")
    if lambda_max < 0 or lambda_min < 0:
        raise ValueError("lambda_max and lambda_min must be >= 0")
    q = min(Q - 1, t * Q // T)
    if q == 0:
        return 0.0
    if Q == 2:
        return float(lambda_max)
    return lambda_min + (lambda_max - lambda_min) * (q - 1) / (Q - 2)
