"""How `switchboard chaos overload` counts logins: from the workers' /health."""

from app.chaos.overload import _committed_rate, _password_logins


def test_committed_logins_are_summed_over_the_workers() -> None:
    healths = [{"password_logins": 120}, {"password_logins": 7}, {"password_logins": 0}]
    assert _password_logins(healths) == 127


def test_a_worker_that_did_not_answer_leaves_the_count_unknown() -> None:
    # A partial sum would read as a drop in logins: the window falls back to the
    # generator's count instead.
    assert _password_logins([{"password_logins": 120}, None]) is None
    assert _password_logins([{"password_logins": 120}, {"healthy": False}]) is None


def test_the_rate_is_over_each_workers_own_report_times() -> None:
    # w1 answered the closing read 3 s late (its count then covers 13 s, not 10):
    # divided by its own report times, the rate is still the true 100/s.
    before = [(1_000, 50.0), (0, 50.2)]
    after = [(2_300, 63.0), (500, 60.2)]
    assert _committed_rate(before, after) == 100.0 + 50.0


def test_no_rate_without_both_reads() -> None:
    assert _committed_rate(None, [(1, 1.0)]) is None
    assert _committed_rate([(1, 1.0)], None) is None
