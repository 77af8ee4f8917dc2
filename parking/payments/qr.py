"""Where a held gate's QR code points: the pay page (parking/pages/), never the JSON API."""

from uuid import UUID


def gate_payment_page_url(public_base_url: str, capture_id: UUID | str) -> str:
    """The capture id is the QR's secret: random, and valid only for this held exit."""
    return f"{public_base_url}/pay/{capture_id}"
