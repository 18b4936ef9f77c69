"""crds/backoff.py: the one retry-delay policy of both products."""

import pytest

from crds.backoff import Backoff


def test_delays_double_from_base_to_the_cap_and_stay_there():
    policy = Backoff(base=0.25, cap=5.0, jitter=False)
    assert [policy.delay(n) for n in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_jitter_keeps_every_delay_between_half_and_all_of_the_ceiling():
    policy = Backoff(base=1.0, cap=8.0)
    for failures, ceiling in [(0, 1.0), (2, 4.0), (9, 8.0)]:
        assert policy.delay(failures, rand=lambda: 0.0) == ceiling / 2
        assert policy.delay(failures, rand=lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)


def test_a_huge_failure_count_is_the_cap_not_an_overflow():
    assert Backoff(base=0.5, cap=30.0, jitter=False).delay(10**9) == 30.0


@pytest.mark.parametrize("base, cap", [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_a_policy_that_cannot_wait_sensibly_is_refused(base, cap):
    with pytest.raises(ValueError, match="base"):
        Backoff(base=base, cap=cap)
