"""The dashboard page (one self-contained file shipped with the package) and a
Content-Security-Policy that lets exactly its own inline script and style run."""

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files


@dataclass(frozen=True, slots=True)
class Page:
    html: str
    content_security_policy: str


def _source_hash(html: str, tag: str) -> str:
    match = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    if match is None:
        raise ValueError(f"the dashboard page has no <{tag}> element")
    digest = hashlib.sha256(match.group(1).encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


@cache
def dashboard_page() -> Page:
    html = files("parking.dashboard").joinpath("index.html").read_text(encoding="utf-8")
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_source_hash(html, 'script')}",
            f"style-src {_source_hash(html, 'style')}",
            # Capture frames are fetched with the bearer token and shown from blob URLs.
            "img-src blob:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return Page(html, policy)
