"""The storm gate's decisions (app/cluster/storm_gate.py): limit new connections only
while password logins are refused, at about the rate sessions open."""

from app.cluster.storm_gate import CALM_S, FLOOR, HEADROOM, Reading, StormGate, reading


def health(shed_login: int, password_logins: int, resumes: int = 0) -> dict[str, object]:
    return {
        "shed": {"login": shed_login, "register": 0, "resume": 5, "token": 0},
        "password_logins": password_logins,
        "token_logins": 0,
        "resumes": resumes,
    }


def test_a_reading_sums_the_workers_and_needs_every_one() -> None:
    got = reading([health(3, 100, 10), health(1, 50)], at=7.0)
    assert got == Reading(shed=4, served=160, at=7.0)  # resume sheds are not counted
    assert reading([health(3, 100), None], at=7.0) is None


def test_engages_on_refused_logins_at_the_rate_sessions_open_and_lifts_when_calm() -> None:
    gate = StormGate(processes=2)
    assert gate.observe(Reading(0, 0, 0.0)) is None  # the first look only sets a base
    assert gate.observe(Reading(0, 600, 1.0)) is None  # busy, nothing refused: no limit
    limit = gate.observe(Reading(50, 1200, 2.0))  # 600 sessions/s, logins refused
    assert limit == round(HEADROOM * 600 / 2)
    # Refusals go on: set again every look (a restarted HAProxy starts without it).
    assert gate.observe(Reading(90, 1800, 3.0)) == limit
    t, served = 3.0, 1800
    while t < 3.0 + CALM_S - 1:
        t, served = t + 1, served + 600
        assert gate.observe(Reading(90, served, t)) == limit  # calm, not for long enough
    assert gate.observe(Reading(90, served + 600, 3.0 + CALM_S)) == 0  # lifted
    assert gate.observe(Reading(90, served + 1200, 4.0 + CALM_S)) is None  # and stays so


def test_a_reconnect_storm_alone_never_engages_it() -> None:
    gate = StormGate(processes=2)
    for second in range(10):  # 3,000 resumes a second, no password login refused
        assert gate.observe(Reading(0, 3000 * second, float(second))) is None
    assert gate.limit == 0


def test_at_least_the_floor_and_a_worker_restart_is_no_signal() -> None:
    gate = StormGate(processes=4)
    gate.observe(Reading(0, 0, 0.0))
    assert gate.observe(Reading(10, 5, 1.0)) == FLOOR  # 5 sessions/s: the floor
    # A worker restarted: its counters start from 0, the sums fall; not a refusal.
    assert gate.observe(Reading(2, 1, 2.0)) is None
