"""The APDS v4 shapes our routes answer with, for the route documentation (`/docs`). The
answers themselves are built as plain dicts (`parking.apds.service`) and checked against the
official document's schemas by tests/test_apds.py; these models document their outline."""

from pydantic import BaseModel, ConfigDict

from parking.apds.shapes import Json


class PaginatedListMeta(BaseModel):
    # Unix epoch seconds when the page was built.
    referenceInstant: int
    offset: int
    pageSize: int
    total: int


class _List(BaseModel):
    model_config = ConfigDict(extra="allow")

    meta: PaginatedListMeta
    data: list[Json]


class HierarchyElementList(_List):
    """APDS `HierarchyElementList`: car parks as `Place`s."""


class RateTableList(_List):
    """APDS `RateTableList`: tariff versions as `RateTable`s."""


class RightSpecificationList(_List):
    """APDS `RightSpecificationList`: the company's right specifications."""


class AssignedRightList(_List):
    """APDS `AssignedRightList`: the company's assigned rights (they name plates)."""


class SessionList(_List):
    """APDS `SessionList`: stays as `Session`s."""


class ResponseStatus(BaseModel):
    """APDS `ResponseStatus`: every error on the APDS routes, and a created subscription."""

    status: str
    code: int | None = None
    message: str | None = None
