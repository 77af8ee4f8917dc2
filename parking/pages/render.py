"""The pages' templates, their texts in both languages and the headers they are served with."""

from datetime import datetime
from functools import cache
from typing import Any, Literal
from zoneinfo import ZoneInfo

import jinja2
from fastapi.responses import HTMLResponse

from billing.notifications import format_duration
from billing.tariff import format_fen
from parking.pages.texts import TEXTS

Lang = Literal["zh", "en"]

# Scripts and styles from this origin only (the package's /static/pages/), no inline code.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # Frames are signed receipt URLs on this origin, or fetched with a token as blobs.
        "img-src 'self' blob:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "private, no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("parking.pages", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fen"] = format_fen
    return env


def texts(lang: Lang) -> dict[str, str]:
    return {key: both[lang] for key, both in TEXTS.items()}


def render(
    template: str, lang: Lang, tz: ZoneInfo, status_code: int = 200, **context: Any
) -> HTMLResponse:
    def local(at: datetime | None, pattern: str = "%Y-%m-%d %H:%M") -> str:
        return at.astimezone(tz).strftime(pattern) if at else "—"

    def duration(since: datetime | None, until: datetime) -> str:
        return format_duration(int((until - since).total_seconds()), lang) if since else "—"

    html = (
        _environment()
        .get_template(template)
        .render(
            lang=lang,
            other_lang="en" if lang == "zh" else "zh",
            t=texts(lang),
            local=local,
            duration=duration,
            **context,
        )
    )
    return HTMLResponse(html, status_code=status_code, headers=HEADERS)
