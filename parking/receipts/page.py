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

_TEXT: dict[str, dict[Lang, str]] = {
    "title": {"zh": "停车凭证", "en": "Parking receipt"},
    "switch": {"zh": "English", "en": "中文"},
    "car_park": {"zh": "停车场", "en": "Car park"},
    "plate": {"zh": "车牌", "en": "Plate"},
    "entered": {"zh": "入场时间", "en": "Entered"},
    "exited": {"zh": "离场时间", "en": "Left"},
    "duration": {"zh": "停车时长", "en": "Duration"},
    "status": {"zh": "状态", "en": "Status"},
    "refunded": {"zh": "已退款", "en": "Refunded"},
    "fee": {"zh": "费用明细", "en": "Fee"},
    "discount": {"zh": "优惠", "en": "Discount"},
    "frames": {"zh": "出入口照片", "en": "Gate photos"},
    "entry_frame": {"zh": "入场", "en": "Entry"},
    "exit_frame": {"zh": "离场", "en": "Exit"},
    "no_frame": {"zh": "照片已按规定删除或不可用", "en": "Photo erased or unavailable"},
    "dispute": {"zh": "不是我的车", "en": "Not my car"},
    "dispute_note": {
        "zh": "如照片中不是您的车，点此申诉；未扣款的费用将暂停扣款，由运营方核对后处理。",
        "en": "If the photos do not show your car, tap here: a fee not yet taken is held, and "
        "the car park decides after checking both photos.",
    },
    "dispute_open": {
        "zh": "申诉处理中：运营方将核对出入口照片后通知您。",
        "en": "Dispute under review: the car park will check both photos and tell you.",
    },
    "dispute_driver_right": {
        "zh": "申诉成立：该费用已取消或退还。",
        "en": "Dispute upheld: the fee was cancelled or refunded.",
    },
    "dispute_charge_stands": {
        "zh": "申诉未成立：运营方核对照片后确认该费用。",
        "en": "Dispute not upheld: the car park confirmed the fee after checking the photos.",
    },
}
_STATUS: dict[str, dict[Lang, str]] = {
    "pending": {"zh": "待扣款", "en": "Being charged"},
    "succeeded": {"zh": "已扣款", "en": "Charged"},
    "failed": {"zh": "扣款失败，请在App中缴纳", "en": "Not collected: pay it in the app"},
    "cancelled": {"zh": "已取消，无需支付", "en": "Cancelled: nothing to pay"},
}


def _t(key: str, lang: Lang) -> str:
    return escape(_TEXT[key][lang])


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
        picture = (
            f'<img src="{escape(url)}" alt="{_t(which + "_frame", lang)}" loading="lazy">'
            if url
            else f'<p class="note">{_t("no_frame", lang)}</p>'
        )
        figures.append(
            f"<figure>{picture}<figcaption>{_t(which + '_frame', lang)}</figcaption></figure>"
        )
    if receipt.dispute is None:
        dispute = (
            f'<form method="post" action="/r/{escape(token)}/dispute?lang={lang}">'
            f'<button type="submit">{_t("dispute", lang)}</button></form>'
            f'<p class="note">{_t("dispute_note", lang)}</p>'
        )
    else:
        dispute = f"<p>{_t('dispute_' + receipt.dispute.status, lang)}</p>"
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
<title>{_t("title", lang)}</title>
<style>{_STYLE}</style>
</head>
<body>
<main>
<a class="lang" href="?lang={other}">{_t("switch", lang)}</a>
<h1>{_t("title", lang)}</h1>
<section>
<div class="fee">{escape(format_fen(receipt.charge.amount_fen))}</div>
<dl>
<dt>{_t("status", lang)}</dt><dd>{escape(_STATUS[receipt.charge.status][lang])}</dd>
{refunded}
<dt>{_t("car_park", lang)}</dt><dd>{escape(receipt.car_park)}</dd>
<dt>{_t("plate", lang)}</dt><dd>{escape(receipt.plate)}</dd>
<dt>{_t("entered", lang)}</dt><dd>{_time(receipt.entered_at, tz)}</dd>
<dt>{_t("exited", lang)}</dt><dd>{_time(receipt.exited_at, tz)}</dd>
<dt>{_t("duration", lang)}</dt><dd>{escape(format_duration(seconds, lang))}</dd>
</dl>
</section>
<section>
<h2>{_t("fee", lang)}</h2>
<table>{rows}</table>
</section>
<section>
<h2>{_t("frames", lang)}</h2>
<div class="frames">{"".join(figures)}</div>
</section>
<section>{dispute}</section>
</main>
</body>
</html>
"""
