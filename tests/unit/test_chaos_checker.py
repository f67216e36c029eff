"""The chaos checker must catch loss, duplication and disorder (it judges the real runs)."""

from __future__ import annotations

from app.chaos.checker import Ledger, judge


def _ledger() -> Ledger:
    ledger = Ledger()
    ledger.record_ack("a-1", 10, "bob")
    ledger.record_ack("a-2", 11, "bob")
    return ledger


def test_a_clean_run_passes() -> None:
    ledger = _ledger()
    for device in ("phone", "laptop"):
        ledger.session("bob", device).received += [(1, 10), (2, 11)]
    verdict = judge("x", ledger, {"bob": ["phone", "laptop"]}, connected=2, presence_mismatches=0)
    assert verdict.ok
    assert (verdict.acknowledged, verdict.received, verdict.lost) == (2, 4, 0)


def test_a_message_missing_on_one_device_is_lost() -> None:
    ledger = _ledger()
    ledger.session("bob", "phone").received += [(1, 10), (2, 11)]
    ledger.session("bob", "laptop").received += [(1, 10)]
    verdict = judge("x", ledger, {"bob": ["phone", "laptop"]}, connected=2, presence_mismatches=0)
    assert verdict.lost == 1 and not verdict.ok


def test_duplicates_gaps_and_disorder_fail() -> None:
    ledger = _ledger()
    ledger.session("bob", "phone").received += [(1, 10), (2, 11), (2, 11)]
    verdict = judge("x", ledger, {"bob": ["phone"]}, connected=1, presence_mismatches=0)
    assert verdict.duplicated == 1 and verdict.out_of_order == 1 and not verdict.ok
    ledger = _ledger()
    ledger.session("bob", "phone").received += [(2, 11), (1, 10)]
    verdict = judge("x", ledger, {"bob": ["phone"]}, connected=1, presence_mismatches=0)
    assert verdict.out_of_order == 1 and verdict.lost == 0


def test_a_cmid_acknowledged_with_two_ids_is_a_duplicate() -> None:
    ledger = _ledger()
    ledger.record_ack("a-1", 12, "bob")
    ledger.session("bob", "phone").received += [(1, 10), (2, 11), (3, 12)]
    verdict = judge("x", ledger, {"bob": ["phone"]}, connected=1, presence_mismatches=0)
    assert verdict.duplicated == 1


def test_disconnected_sessions_and_presence_mismatches_fail() -> None:
    ledger = _ledger()
    ledger.session("bob", "phone").received += [(1, 10), (2, 11)]
    assert not judge("x", ledger, {"bob": ["phone"]}, connected=0, presence_mismatches=0).ok
    assert not judge("x", ledger, {"bob": ["phone"]}, connected=1, presence_mismatches=1).ok


def test_gaps_left_by_own_sends_are_in_order() -> None:
    ledger = _ledger()
    log = ledger.session("bob", "phone")
    log.received += [(1, 10), (3, 11)]
    log.own_seqs.add(2)  # bob's own message, answered with `sent`
    verdict = judge("x", ledger, {"bob": ["phone"]}, connected=1, presence_mismatches=0)
    assert verdict.out_of_order == 0 and verdict.ok
