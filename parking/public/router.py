"""The public, read-only API for guidance signs and the city platform."""

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1/public", tags=["public"])
