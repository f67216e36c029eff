"""The verdict of a chaos run: was every acknowledged message delivered exactly once, in order?

Pure bookkeeping, no I/O: clients record what the server acknowledged and
what the application received; ``judge`` compares them.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass(slots=True)
class SessionLog:
    """What one device of one user saw, in the order the application saw it."""

    user: str
    device: str
    received: list[tuple[int, int]] = field(default_factory=list)  # (seq, message id)
    # Seqs of this device's own sends: the server answers them with `sent`, not `msg`.
    own_seqs: set[int] = field(default_factory=set)
    resumes: int = 0
    reconnects: int = 0
    worker: str = ""


@dataclass(slots=True)
class Ledger:
    # message id -> recipient user, for every send the server acknowledged.
    acked: dict[int, str] = field(default_factory=dict)
    # cmid -> message id: a cmid acknowledged twice with different ids is a duplicate.
    ids_by_cmid: dict[str, int] = field(default_factory=dict)
    cmid_conflicts: int = 0
    sessions: dict[tuple[str, str], SessionLog] = field(default_factory=dict)

    def session(self, user: str, device: str) -> SessionLog:
        key = (user, device)
        if key not in self.sessions:
            self.sessions[key] = SessionLog(user, device)
        return self.sessions[key]

    def record_ack(self, cmid: str, message_id: int, recipient: str) -> None:
        previous = self.ids_by_cmid.setdefault(cmid, message_id)
        if previous != message_id:
            self.cmid_conflicts += 1
        self.acked[message_id] = recipient


@dataclass(frozen=True, slots=True)
class Verdict:
    scenario: str
    acknowledged: int
    received: int
    lost: int
    duplicated: int
    out_of_order: int
    sessions: int
    sessions_resumed: int
    sessions_connected: int
    presence_mismatches: int
    notes: tuple[str, ...] = ()
    # Workers the others declared dead during the run, and how many the fault should
    # cost (None: not judged); workers that registered again (fenced, or restarted).
    declared_dead: int = 0
    expect_dead: int | None = None
    registered_again: int = 0
    # Timing, from the moment the fault was injected: the sessions that resumed after
    # it (reconnected and got their welcome), how long until half, 99 % and all of them
    # had, and the longest any send waited for its `sent`.
    resumed_after_fault: int = 0
    resume_p50_s: float | None = None
    resume_p99_s: float | None = None
    resume_max_s: float | None = None
    longest_send_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.out_of_order == 0
            and self.sessions_connected == self.sessions
            and self.presence_mismatches == 0
            and (self.expect_dead is None or self.declared_dead == self.expect_dead)
        )

    def format(self) -> str:
        lines = [
            f"scenario {self.scenario}: {'PASS' if self.ok else 'FAIL'}",
            f"  messages acknowledged {self.acknowledged}, received {self.received}, "
            f"lost {self.lost}, duplicated {self.duplicated}, out of order {self.out_of_order}",
            f"  sessions {self.sessions}, resumed {self.sessions_resumed}, "
            f"connected at the end {self.sessions_connected}, "
            f"presence mismatches {self.presence_mismatches}",
            f"  workers declared dead {self.declared_dead}"
            + ("" if self.expect_dead is None else f" (expected {self.expect_dead})")
            + f", registered again {self.registered_again}",
        ]
        if self.resume_p99_s is not None:
            lines.append(
                f"  after the fault: {self.resumed_after_fault} sessions resumed, 99 % within "
                f"{self.resume_p99_s:.2f} s (p50 {self.resume_p50_s:.2f} s, "
                f"max {self.resume_max_s:.2f} s); longest send stall {self.longest_send_s:.2f} s"
            )
        else:
            lines.append(f"  no session resumed; longest send stall {self.longest_send_s:.2f} s")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def judge(
    scenario: str,
    ledger: Ledger,
    devices_by_user: dict[str, list[str]],
    connected: int,
    presence_mismatches: int,
    notes: tuple[str, ...] = (),
) -> Verdict:
    """Each acknowledged message must reach each device of its recipient once, in order."""
    lost = duplicated = out_of_order = received = 0
    seen_by_session: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    for key, log in ledger.sessions.items():
        seqs = [seq for seq, _ in log.received]
        out_of_order += sum(
            1
            for a, b in itertools.pairwise(seqs)
            if b <= a or any(gap not in log.own_seqs for gap in range(a + 1, b))
        )
        counts = seen_by_session[key]
        counts.update(message_id for _, message_id in log.received)
        duplicated += sum(n - 1 for n in counts.values() if n > 1)
        received += len(log.received)
    for message_id, recipient in ledger.acked.items():
        for device in devices_by_user.get(recipient, []):
            if seen_by_session[(recipient, device)][message_id] == 0:
                lost += 1
    return Verdict(
        scenario=scenario,
        acknowledged=len(ledger.acked),
        received=received,
        lost=lost,
        duplicated=duplicated + ledger.cmid_conflicts,
        out_of_order=out_of_order,
        sessions=len(ledger.sessions),
        sessions_resumed=sum(1 for s in ledger.sessions.values() if s.resumes > 0),
        sessions_connected=connected,
        presence_mismatches=presence_mismatches,
        notes=notes,
    )


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (nearest rank), which must not be empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]
