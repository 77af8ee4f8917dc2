"""The receipt page: server-rendered HTML, one inline style, nothing from elsewhere (no CDN,
no script), readable on a 360-px phone. Chinese first, English with `?lang=en`."""

import base64
import hashlib
from datetime import datetime
from html import escape
from typing import Literal
from zoneinfo import ZoneInfo

from billing.notifications import format_duration
from billing.tariff import format_fen
from parking.pages.texts import TEXTS
from parking.receipts.schemas import ReceiptView

Lang = Literal["zh", "en"]

_STYLE = """
*{box-sizing:border-box}body{margin:0;font:16px/1.5 system-ui,-apple-system,"PingFang SC",
"Microsoft YaHei",sans-serif;background:#f4f5f7;color:#1d2129}main{max-width:480px;margin:0 auto;
padding:12px}h1{font-size:20px;margin:4px 0 12px}section{background:#fff;border-radius:8px;
padding:12px;margin-bottom:12px}dl{display:grid;grid-template-columns:auto 1fr;gap:4px 12px;
margin:0}dt{color:#6b7280}dd{margin:0;word-break:break-all}.fee{font-size:28px;font-weight:600}
.frames{display:grid;grid-template-columns:1fr 1fr;gap:8px}figure{margin:0}figure img{width:100%;
height:auto;border-radius:4px;background:#e5e7eb}figcaption{font-size:13px;color:#6b7280}
table{width:100%;border-collapse:collapse;font-size:14px}td{padding:2px 0}td:last-child{
text-align:right}button{width:100%;padding:12px;font-size:16px;border:0;border-radius:8px;
background:#d93025;color:#fff}.note{font-size:14px;color:#6b7280}.lang{float:right;font-size:14px}
"""

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "style-src 'sha256-"
        + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
        + "'",
        "img-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)


def _t(key: str, lang: Lang) -> str:
    return escape(TEXTS[key][lang])


def _time(at: datetime | None, tz: ZoneInfo) -> str:
    return at.astimezone(tz).strftime("%Y-%m-%d %H:%M") if at else "—"


def render(receipt: ReceiptView, token: str, lang: Lang, tz: ZoneInfo) -> str:
    other: Lang = "en" if lang == "zh" else "zh"
    seconds = receipt.duration_minutes * 60
    rows = "".join(
        f"<tr><td>{escape(s.start.astimezone(tz).strftime('%m-%d %H:%M'))}–"
        f"{escape(s.end.astimezone(tz).strftime('%H:%M'))} {escape(s.band)}</td>"
        f"<td>{escape(format_fen(s.fen))}</td></tr>"
        for s in receipt.fee.segments
    )
    if receipt.fee.discount_fen:
        rows += (
            f"<tr><td>{_t('discount', lang)}</td>"
            f"<td>-{escape(format_fen(receipt.fee.discount_fen))}</td></tr>"
        )
    figures = []
    for which, url in (("entry", receipt.frames.entry), ("exit", receipt.frames.exit)):
        caption = _t(f"receipt_{which}_frame", lang)
        picture = (
            f'<img src="{escape(url)}" alt="{caption}" loading="lazy">'
            if url
            else f'<p class="note">{_t("no_frame", lang)}</p>'
        )
        figures.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
    if receipt.dispute is None:
        dispute = (
            f'<form method="post" action="/r/{escape(token)}/dispute?lang={lang}">'
            f'<button type="submit">{_t("not_my_car", lang)}</button></form>'
            f'<p class="note">{_t("receipt_dispute_note", lang)}</p>'
        )
    else:
        dispute = f"<p>{_t('receipt_dispute_' + receipt.dispute.status, lang)}</p>"
    refunded = (
        f"<dt>{_t('refunded', lang)}</dt><dd>{escape(format_fen(receipt.refunded_fen))}</dd>"
        if receipt.refunded_fen
        else ""
    )
    return f"""<!doctype html>
<html lang="{"zh-CN" if lang == "zh" else "en"}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{_t("receipt_title", lang)}</title>
<style>{_STYLE}</style>
</head>
<body>
<main>
<a class="lang" href="?lang={other}">{_t("switch", lang)}</a>
<h1>{_t("receipt_title", lang)}</h1>
<section>
<div class="fee">{escape(format_fen(receipt.charge.amount_fen))}</div>
<dl>
<dt>{_t("status", lang)}</dt><dd>{_t("receipt_charge_" + receipt.charge.status, lang)}</dd>
{refunded}
<dt>{_t("car_park", lang)}</dt><dd>{escape(receipt.car_park)}</dd>
<dt>{_t("plate", lang)}</dt><dd>{escape(receipt.plate)}</dd>
<dt>{_t("entered", lang)}</dt><dd>{_time(receipt.entered_at, tz)}</dd>
<dt>{_t("exited", lang)}</dt><dd>{_time(receipt.exited_at, tz)}</dd>
<dt>{_t("duration", lang)}</dt><dd>{escape(format_duration(seconds, lang))}</dd>
</dl>
</section>
<section>
<h2>{_t("receipt_fee", lang)}</h2>
<table>{rows}</table>
</section>
<section>
<h2>{_t("receipt_frames", lang)}</h2>
<div class="frames">{"".join(figures)}</div>
</section>
<section>{dispute}</section>
</main>
</body>
</html>
"""
