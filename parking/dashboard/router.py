"""The operator dashboard: one page served by the app, fed live by server-sent events."""

from fastapi import APIRouter

router = APIRouter(tags=["dashboard"])
