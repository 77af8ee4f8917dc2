"""Fee calculation. Integer fen only; a stay is priced by the tariff in force when it began."""

from dataclasses import dataclass
from datetime import datetime

_DAY_S = 24 * 3600
_HOUR_S = 3600


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class Tariff:
    free_minutes: int
    hourly_fen: int
    daily_cap_fen: int | None = None

    def fee_for_seconds(self, seconds: int) -> int:
        """Free when the whole stay fits in the free minutes; otherwise every started hour from
        the start is charged, each started 24 h block capped at the daily cap."""
        if seconds <= self.free_minutes * 60:
            return 0
        full_days, rest = divmod(seconds, _DAY_S)
        day_fee = 24 * self.hourly_fen
        rest_fee = _ceil_div(rest, _HOUR_S) * self.hourly_fen
        if self.daily_cap_fen is not None:
            day_fee = min(day_fee, self.daily_cap_fen)
            rest_fee = min(rest_fee, self.daily_cap_fen)
        return full_days * day_fee + rest_fee

    def fee(self, entered_at: datetime, exited_at: datetime) -> int:
        seconds = max(0, int((exited_at - entered_at).total_seconds()))
        return self.fee_for_seconds(seconds)


def format_fen(amount_fen: int) -> str:
    """¥12.00 for 1200 fen, exactly (no float on the way)."""
    yuan, fen = divmod(amount_fen, 100)
    return f"¥{yuan}.{fen:02d}"
