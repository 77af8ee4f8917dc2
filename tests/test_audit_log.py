"""The operator's audit log (GET /api/v1/operator/audit-log): what the company's own staff
did, newest first, a page at a time, for admins; another company's lines never show."""

import httpx
from fastapi import FastAPI

from billing import audit
from parking.runtime import Runtime
from tests.conftest import Lot, bearer, create_lot, make_staff, staff_token

URL = "/api/v1/operator/audit-log"


async def test_admins_read_their_companys_audit_log_page_by_page(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot
) -> None:
    other = await create_lot(runtime)
    admin_x = await make_staff(runtime, lot.operator_id, "admin")
    attendant_x = await make_staff(runtime, lot.operator_id, "attendant")
    admin_y = await make_staff(runtime, other.operator_id, "admin")
    async with runtime.pool.acquire() as conn:
        for n, (who, action) in enumerate(
            [
                (admin_x, "charge.confirmed"),
                (attendant_x, "lane_exception.resolved"),
                (admin_y, "charge.confirmed"),
                (admin_x, "refund.requested"),
            ]
        ):
            await audit.record(conn, f"operator_user:{who.user_id}", action, f"thing:{n}", {"n": n})
    as_x = bearer(staff_token(app, admin_x))

    first = await api.get(URL, headers=as_x, params={"limit": 2})
    assert first.status_code == 200, first.text
    page = first.json()
    assert [e["subject"] for e in page["entries"]] == ["thing:3", "thing:1"]
    assert page["entries"][0]["actor_email"] == admin_x.email
    assert page["entries"][0]["detail"] == {"n": 3}
    rest = (
        await api.get(URL, headers=as_x, params={"limit": 2, "before": page["next_before"]})
    ).json()
    assert [e["subject"] for e in rest["entries"]] == ["thing:0"]
    assert rest["next_before"] is None

    confirmed = (await api.get(URL, headers=as_x, params={"action": "charge.confirmed"})).json()
    assert [e["subject"] for e in confirmed["entries"]] == ["thing:0"]
    as_y = bearer(staff_token(app, admin_y))
    assert [e["subject"] for e in (await api.get(URL, headers=as_y)).json()["entries"]] == [
        "thing:2"
    ]

    denied = await api.get(URL, headers=bearer(staff_token(app, attendant_x)))
    assert denied.status_code == 403
    bad = await api.get(URL, headers=as_x, params={"action": "drop table"})
    assert bad.status_code == 422 and "error" in bad.json()
