"""What a control loop's tick saw and did, as a sentence, and the log that records it.

The worker's loops (liveness.py's lease and reaper, revoke.py's session
recheck) return a `Decision` per tick, as Patroni's ``ha.py`` does for every HA
loop. `DecisionLog` logs a loop's decision only when it differs from that
loop's previous one, so a steady state costs no log lines and every change is
explained.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.logs import EventLogger


@dataclass(frozen=True, slots=True)
class Decision:
    """What one tick saw and did; ``level`` (info or warning) is how loudly it is
    logged when it differs from the loop's previous decision."""

    text: str
    level: str = "info"


class DecisionLog:
    """Logs ``<loop>_decision`` events on ``logger`` when a loop's decision changes."""

    def __init__(self, logger: EventLogger) -> None:
        self._log = logger
        self._said: dict[str, str] = {}

    def say(self, loop: str, decision: Decision) -> None:
        if self._said.get(loop) == decision.text:
            return
        self._said[loop] = decision.text
        log_at = self._log.warning if decision.level == "warning" else self._log.info
        log_at(f"{loop}_decision", decision=decision.text)
