"""Fault injection against a real cluster, and the checker that judges the outcome.

``switchboard chaos SCENARIO`` and ``tests/chaos/`` run the same scenarios:
real clients exchange messages through HAProxy while a real fault happens
(kill -9 of a worker or of the Patroni leader, a rolling restart, a drain).
"""
