import pytest

from feddip_kernels import lambda_schedule, sparsity_schedule


def test_sparsity_schedule_cubic():
    assert sparsity_schedule(0, 100, 0.5, 0.95) == pytest.approx(0.5)
    assert sparsity_schedule(100, 100, 0.5, 0.95) == pytest.approx(0.95)
    assert sparsity_schedule(150, 100, 0.5, 0.95) == pytest.approx(0.95)
    assert sparsity_schedule(50, 100, 0.5, 0.95) == pytest.approx(0.95 + (0.5 - 0.95) * 0.125)
    values = [sparsity_schedule(t, 100, 0.5, 0.95) for t in range(101)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        sparsity_schedule(-1, 100, 0.5, 0.95)
    with pytest.raises(ValueError):
        sparsity_schedule(1, 0, 0.5, 0.95)
    with pytest.raises(ValueError):
        sparsity_schedule(1, 10, 1.5, 0.95)


def test_lambda_schedule_segments():
    T, Q = 200, 20  # segments of 10 rounds
    assert all(lambda_schedule(t, T, 1e-2, Q) == 0.0 for t in range(10))
    assert lambda_schedule(10, T, 1e-2, Q) == pytest.approx(5e-4)
    assert lambda_schedule(19, T, 1e-2, Q) == pytest.approx(5e-4)
    # The authors' rule: segment i >= 1 has 5e-4 + (lambda_max - 5e-4) (i - 1) / 19 (docs/protocol.md)
    assert lambda_schedule(20, T, 1e-2, Q) == pytest.approx(5e-4 + (1e-2 - 5e-4) / 19)
    assert lambda_schedule(199, T, 1e-2, Q) == pytest.approx(5e-4 + (1e-2 - 5e-4) * 18 / 19)
    assert lambda_schedule(500, T, 1e-2, Q) == lambda_schedule(199, T, 1e-2, Q)
    values = [lambda_schedule(t, T, 1e-2, Q) for t in range(T)]
    assert values == sorted(values)
    assert len(set(values)) == Q
    assert lambda_schedule(1, 2, 0.3, Q=2) == 5e-4  # one rising segment: it starts at lambda_min
    with pytest.raises(ValueError):
        lambda_schedule(0, 10, 1e-2, Q=1)
