"""The exit decision's rules for a stay the lane has found: what it costs and how it may leave.

Pure functions, no I/O. The lane (`service.py`) calls `exit_rule` inside its transaction with
the stay and the driver's pay-later state it read with it; the city-day loader
(`parking_dev.citybench`) decides the stays it generates with the same function, and its test
re-decides every loaded stay with it. A change to when a stay is free, pay-later or held, or
to what it is charged, belongs here, so that neither can drift from the other.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from billing import fees
from parking.lanes.repository import PayLater

Outcome = Literal[
    "entered",
    "entered_superseding",
    "duplicate_read",
    "exited_free",
    "exited_pay_later",
    "held_unbound",
    "held_no_agreement",
    "held_over_limit",
    "held_arrears",
    "held_no_entry",
    "held_unreadable",
    "held_ambiguous",
    "held_no_tariff",
    "exited_offline_unpaid",
    # An offline capture the gate sent to the booth: the stay awaits a booth payment.
    "exited_offline_booth",
    # An offline capture of a stay the booth was already paid for.
    "exited_paid_at_booth",
]


@dataclass(frozen=True, slots=True)
class ExitRule:
    """How a priced stay leaves: `exited_free`, `exited_pay_later` (charged `fee_fen` to
    `charge_to`, an (account, agreement)), or held with why (`held_unbound`,
    `held_no_agreement`, `held_arrears`, `held_over_limit`) and `due_fen` at the gate."""

    outcome: Outcome
    fee_fen: int
    # The driver's open debts (known only while the account is blocked for arrears).
    debt_fen: int = 0
    charge_to: tuple[int, int] | None = None

    @property
    def due_fen(self) -> int:
        """What a held exit's payment QR asks for: the stay's fee and the debts behind it."""
        return self.fee_fen + self.debt_fen


def pay_later(found: PayLater | None, fee: int) -> tuple[int, int] | Outcome:
    """(account, agreement) when a stay with a fee may leave on pay-later, else why it is held."""
    if found is None:
        return "held_unbound"
    if found.agreement_id is None or found.per_session_limit_fen is None:
        return "held_no_agreement"
    if found.blocked_for_arrears:
        return "held_arrears"
    if fee > found.per_session_limit_fen:
        return "held_over_limit"
    return found.account_id, found.agreement_id


def exit_rule(
    versions: fees.TariffVersions,
    *,
    entered_at: datetime,
    at: datetime,
    plate_color: str | None,
    fixed_fee_fen: int | None,
    pay_later_state: PayLater | None,
) -> ExitRule | None:
    """The stay's fee at `at` and how it leaves; None when the car park has no tariff for it
    (the gate holds for a person)."""
    priced = fees.stay_fee(
        versions,
        entered_at=entered_at,
        at=at,
        plate_color=plate_color,
        fixed_fee_fen=fixed_fee_fen,
    )
    if priced is None:
        return None
    fee = priced.fee_fen
    debt = pay_later_state.debt_fen if pay_later_state else 0
    if fee == 0:
        return ExitRule("exited_free", 0, debt)
    verdict = pay_later(pay_later_state, fee)
    if isinstance(verdict, str):
        return ExitRule(verdict, fee, debt)
    return ExitRule("exited_pay_later", fee, debt, verdict)
