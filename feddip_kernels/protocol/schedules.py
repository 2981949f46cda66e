"""FedDIP schedules: cubic sparsity ramp and incremental regularisation strength."""

from __future__ import annotations


def _check_round(t: int, T: int) -> None:
    if T <= 0:
        raise ValueError(f"T must be positive, got {T}")
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")


def sparsity_schedule(t: int, T: int, s0: float, sp: float) -> float:
    """s_t = s_p + (s_0 - s_p) * (1 - t/T)^3, from s_0 at t = 0 to the target s_p at t >= T.

    Parameters
    ----------
    t : the round, >= 0.
    T : rounds of the schedule, > 0.
    s0, sp : the initial and final sparsity, in [0, 1].

    Returns
    -------
    float : s_t.

    Raises
    ------
    ValueError : any argument out of range.
    """
    _check_round(t, T)
    for name, s in (("s0", s0), ("sp", sp)):
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {s}")
    frac = min(t, T) / T
    return sp + (s0 - sp) * (1.0 - frac) ** 3


def lambda_schedule(t: int, T: int, lambda_max: float, Q: int = 20, lambda_min: float = 5e-4) -> float:
    """Incremental regularisation: rounds [0, T) split into Q equal segments; segment 0 has
    lambda = 0, segment i >= 1 has lambda_min + (lambda_max - lambda_min) (i - 1) / (Q - 1), the
    authors' rule (docs/protocol.md; with Q = 20, (i - 1) / 19: the last segment is 18/19 of the
    way to lambda_max). Rounds >= T stay in the last segment.

    Parameters
    ----------
    t : the round, >= 0.
    T : rounds of the schedule, > 0.
    lambda_max, lambda_min : >= 0.
    Q : segments, >= 2.

    Returns
    -------
    float : lambda_t.

    Raises
    ------
    ValueError : any argument out of range.
    """
    _check_round(t, T)
    if Q < 2:
        raise ValueError(f"Q must be >= 2, got {Q}")
    if lambda_max < 0 or lambda_min < 0:
        raise ValueError("lambda_max and lambda_min must be >= 0")
    q = min(Q - 1, t * Q // T)
    if q == 0:
        return 0.0
    return lambda_min + (lambda_max - lambda_min) * (q - 1) / (Q - 1)
