"""The operator API: staff see and change only their own company's car parks."""

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1/operator", tags=["operator"])
