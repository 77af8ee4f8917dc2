"""APDS v4 objects built from our rows, shared by the APDS routes (`parking.apds.service`)
and the push feeds (`parking.feeds`)."""

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

Json = dict[str, Any]

COUNTRY = "cn"
PLATE_COLOURS = {
    "blue": "蓝牌",
    "yellow": "黄牌",
    "green": "绿牌",
    "white": "白牌",
    "black": "黑牌",
}


def time_of(value: datetime) -> str:
    """APDS DateTime: YYYY-MM-DDTHH:MM:SSZ."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def text(zh: str, en: str | None = None) -> list[Json]:
    texts = [{"language": "zh", "string": zh}]
    if en is not None:
        texts.append({"language": "en", "string": en})
    return texts


def occupancy_reference(car_park: Mapping[str, Any], occupied: int, at: datetime) -> Json:
    """A car park's occupancy as an APDS `HierarchyElementReference` (`car_park`: code,
    version, capacity, closed_at)."""
    when = time_of(at)
    capacity = car_park["capacity"]
    percentage = min(100.0, 100.0 * occupied / capacity) if capacity else 100.0
    return {
        "elementId": {"id": car_park["code"], "version": car_park["version"], "className": "Place"},
        "supply": [
            {
                "supplyViewType": "spaceView",
                # A closed car park offers no spaces.
                "supplyQuantity": 0 if car_park["closed_at"] is not None else capacity,
            }
        ],
        "demandTable": [
            {
                "timestamp": when,
                "demandType": [
                    {
                        "count": occupied,
                        "occupancyCalculation": "counted",
                        "percentage": round(percentage, 1),
                        "recordDateTime": when,
                    }
                ],
            }
        ],
    }


def plate_credential(plate: str) -> Json:
    """A vehicle's plate as an APDS `CredentialAssigned`."""
    return {
        "type": "licensePlate",
        "credentialAssignedType": "vehicle",
        "identifier": {"id": plate, "className": "ChineseNumberPlate"},
    }


def operator_reference(operator_id: int) -> Json:
    return {"id": str(operator_id), "version": 1, "className": "Operator"}


# The right specification of a stay without a right: the car park's rates
# (/apds/v4/rights/specs/pay-as-you-go), and the prefix of such a stay's own assigned right
# (/apds/v4/rights/assigned/stay-<stay id>).
PAY_AS_YOU_GO = "pay-as-you-go"
STAY_RIGHT_PREFIX = "stay-"


def stay_right_id(row: Mapping[str, Any]) -> str:
    """The id of the assigned right a stay used (`row`: id, assigned_right_id): the company's
    right it entered under, else its own pay-as-you-go right; both are served."""
    if row["assigned_right_id"] is not None:
        return str(row["assigned_right_id"])
    return f"{STAY_RIGHT_PREFIX}{row['id']}"


def session_view(row: Mapping[str, Any], operator_id: int) -> Json:
    """A stay as an APDS `Session` (it names the plate: for the company's own systems); `row`:
    id, plate, plate_color, entered_at, exited_at, car_park (code), car_park_version,
    assigned_right_id."""
    closed = row["exited_at"] is not None
    segment: Json = {
        "id": f"{row['id']}-1",
        "version": 2 if closed else 1,
        "actualStart": time_of(row["entered_at"]),
        "assignedRight": {"id": stay_right_id(row), "version": 1, "className": "AssignedRight"},
        "validationType": ["licensePlate"],
    }
    session: Json = {
        "id": str(row["id"]),
        "version": 2 if closed else 1,
        "actualStart": time_of(row["entered_at"]),
        "initiator": operator_reference(operator_id),
        "hierarchyElement": {
            "id": row["car_park"],
            "version": row["car_park_version"],
            "className": "Place",
        },
        "identifiedCredentials": [plate_credential(row["plate"])],
        "segments": [segment],
        "identifiedVehicle": {
            "country": COUNTRY,
            "description": PLATE_COLOURS.get(row["plate_color"], row["plate_color"]),
        },
    }
    if closed:
        session["actualEnd"] = segment["actualEnd"] = time_of(row["exited_at"])
    return session
