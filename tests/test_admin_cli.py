"""`parking admin …` against the test database: day one of a company (its car park with a
tariff, its first admin who then signs in, a gate with its broker login and camera key, a city
key that works until revoked, the uncertain-exit policy), each write audit-logged; refused input
writes nothing."""

import asyncio
import io
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from billing.tariff import Tariff
from parking.admin import cli as admin_cli
from parking.admin import service as admin_service
from parking.cli import build_parser
from parking.gates import config as gate_configs
from parking.runtime import Runtime
from parking.settings import Settings
from tests.conftest import bearer

PARKING = Path(sys.executable).parent / "parking"


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


GATE_KEY = gate_configs.generate_private_key()


async def admin(
    database_url: str, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, Any]:
    """`parking admin --json --actor test:admin ARGV…`: its exit status and printed JSON."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=database_url,
        gate_config_key=SecretStr(gate_configs.private_key_pem(GATE_KEY)),
    )
    args = build_parser().parse_args(["admin", "--json", "--actor", "test:admin", *argv])
    capsys.readouterr()
    code = await admin_cli.run(settings, args)
    out = capsys.readouterr()
    return code, orjson.loads(out.out) if code == 0 else out.err


async def _audit(runtime: Runtime, subject: str) -> list[str]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT action FROM audit_log WHERE subject = $1 AND actor = 'test:admin' ORDER BY id",
            subject,
        )
    return [row["action"] for row in rows]


async def test_day_one_of_a_company_without_sql(
    runtime: Runtime,
    database_url: str,
    api: httpx.AsyncClient,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    company_name = _unique("临安城投-")
    code, company = await admin(database_url, capsys, "company", "create", "--name", company_name)
    assert code == 0 and company["name"] == company_name
    car_park_code = _unique("LA")
    code, car_park = await admin(
        database_url,
        capsys,
        "car-park",
        "create",
        "--company",
        company_name,
        "--code",
        car_park_code,
        "--name",
        "城中街停车场",
        "--address",
        "临安区城中街1号",
        "--lat",
        "30.233",
        "--lon",
        "119.72",
        "--capacity",
        "120",
        "--hourly-fen",
        "500",
        "--free-minutes",
        "15",
        "--daily-cap-fen",
        "3000",
    )
    assert code == 0, car_park
    async with runtime.pool.acquire() as conn:
        stored = await conn.fetchrow(
            """SELECT cp.operator_id, cp.address, cp.capacity, cp.latitude, t.rules
               FROM car_parks cp JOIN tariffs t ON t.car_park_id = cp.id WHERE cp.code = $1""",
            car_park_code,
        )
    assert (stored["operator_id"], stored["address"], stored["capacity"]) == (
        company["company_id"],
        "临安区城中街1号",
        120,
    )
    assert Tariff.model_validate(stored["rules"]) == Tariff.hourly(15, 500, 3000)

    # The first admin: a drawn password, printed once, that signs in.
    email = f"{_unique('admin-')}@example.cn"
    code, staff = await admin(
        database_url,
        capsys,
        "staff",
        "create",
        "--company",
        str(company["company_id"]),
        "--email",
        email.upper(),
        "--name",
        "管理员",
    )
    assert code == 0 and staff["role"] == "admin" and staff["email"] == email
    signed_in = await api.post(
        "/api/v1/auth/token",
        json={"grant_type": "password", "email": email, "password": staff["password"]},
    )
    assert signed_in.status_code == 200, signed_in.text

    # A gate: its broker login is in the broker's files, and it has a camera key.
    broker_dir = tmp_path / "broker"
    code, gate = await admin(
        database_url,
        capsys,
        "gate",
        "create",
        "--car-park",
        car_park_code,
        "--code",
        "out1",
        "--direction",
        "out",
        "--broker-dir",
        str(broker_dir),
    )
    assert code == 0, gate
    username = f"gate-{car_park_code}-out1"
    assert gate["broker"]["username"] == username and len(gate["camera_key"]) >= 32
    assert gate["server_public_key"] == gate_configs.public_key_text(GATE_KEY)
    credentials = orjson.loads((broker_dir / "credentials.json").read_bytes())
    assert {"username": username, "password": gate["broker"]["password"]}.items() <= next(
        user for user in credentials["users"] if user["username"] == username
    ).items()
    assert f"user {username}" in (broker_dir / "acl_file").read_text()
    # A second gate keeps the first one's password.
    code, _ = await admin(
        database_url,
        capsys,
        "gate",
        "create",
        "--car-park",
        car_park_code,
        "--code",
        "in1",
        "--direction",
        "in",
        "--broker-dir",
        str(broker_dir),
    )
    again = orjson.loads((broker_dir / "credentials.json").read_bytes())
    assert code == 0 and gate["broker"]["password"] in {u["password"] for u in again["users"]}

    # A city key works until it is revoked; listing never shows it.
    code, key = await admin(
        database_url, capsys, "api-key", "create", "--kind", "city", "--label", "guidance signs"
    )
    assert code == 0 and key["key"].startswith("ck_")
    listed = await api.get("/api/v1/public/car-parks", headers=bearer(key["key"]))
    assert listed.status_code == 200, listed.text
    code, keys = await admin(database_url, capsys, "api-key", "list")
    assert code == 0 and key["key"] not in orjson.dumps(keys).decode()
    code, _ = await admin(database_url, capsys, "api-key", "revoke", str(key["api_key_id"]))
    assert code == 0
    refused = await api.get("/api/v1/public/car-parks", headers=bearer(key["key"]))
    assert refused.status_code == 401

    # A gate key names its gate.
    code, gate_key = await admin(
        database_url,
        capsys,
        "api-key",
        "create",
        "--kind",
        "gate",
        "--gate",
        f"{car_park_code}/out1",
        "--label",
        "out1",
    )
    assert code == 0 and gate_key["key"].startswith("gk_")

    code, policy = await admin(
        database_url,
        capsys,
        "car-park",
        "set-policy",
        "--car-park",
        car_park_code,
        "--uncertain-exit-policy",
        "hold",
    )
    assert code == 0 and (policy["before"], policy["uncertain_exit_policy"]) == (
        "open_confirm",
        "hold",
    )
    async with runtime.pool.acquire() as conn:
        assert (
            await conn.fetchval(
                "SELECT uncertain_exit_policy FROM car_parks WHERE code = $1", car_park_code
            )
            == "hold"
        )
        stored_hash = await conn.fetchval(
            "SELECT count(*) FROM api_keys WHERE key_hash = $1", key["key"]
        )
    assert stored_hash == 0, "only the hash is stored"

    assert await _audit(runtime, f"operator:{company['company_id']}") == ["admin.company_created"]
    assert await _audit(runtime, f"car_park:{car_park['car_park_id']}") == [
        "admin.car_park_created",
        "admin.car_park_policy_set",
    ]
    assert await _audit(runtime, f"operator_user:{staff['user_id']}") == ["admin.staff_created"]
    assert await _audit(runtime, f"gate:{gate['gate_id']}") == ["admin.gate_created"]
    assert await _audit(runtime, f"api_key:{key['api_key_id']}") == [
        "admin.api_key_created",
        "admin.api_key_revoked",
    ]


async def test_a_tariff_file_and_a_password_from_stdin(
    runtime: Runtime,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    company_name = _unique("company-")
    await admin(database_url, capsys, "company", "create", "--name", company_name)
    tariff = Tariff.hourly(30, 800, None)
    tariff_file = tmp_path / "tariff.json"
    tariff_file.write_bytes(orjson.dumps(tariff.to_json()))
    code_ = _unique("TF")
    code, made = await admin(
        database_url,
        capsys,
        "car-park",
        "create",
        "--company",
        company_name,
        "--code",
        code_,
        "--name",
        "西街停车场",
        "--capacity",
        "40",
        "--tariff-file",
        str(tariff_file),
    )
    assert code == 0, made
    async with runtime.pool.acquire() as conn:
        rules = await conn.fetchval(
            "SELECT rules FROM tariffs WHERE car_park_id = $1", made["car_park_id"]
        )
    assert Tariff.model_validate(rules) == tariff

    email = f"{_unique('att-')}@example.cn"
    monkeypatch.setattr(sys, "stdin", io.StringIO("a long passphrase here\n"))
    code, staff = await admin(
        database_url,
        capsys,
        "staff",
        "create",
        "--company",
        company_name,
        "--email",
        email,
        "--name",
        "收费员",
        "--role",
        "attendant",
        "--password-stdin",
    )
    assert code == 0 and "password" not in staff and staff["role"] == "attendant"


@pytest.mark.parametrize(
    "argv",
    [
        ["car-park", "create", "--company", "no such company", "--code", "X1", "--name", "x"],
        ["car-park", "set-policy", "--car-park", "NO-SUCH", "--uncertain-exit-policy", "hold"],
        ["gate", "create", "--car-park", "NO-SUCH", "--code", "g", "--direction", "in"],
        ["api-key", "create", "--kind", "gate", "--label", "no gate named"],
        ["api-key", "create", "--kind", "gate", "--gate", "a/b/c", "--label", "bad gate"],
        ["api-key", "revoke", "999999999"],
    ],
)
async def test_refused_input_writes_nothing(
    runtime: Runtime,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    argv: list[str],
) -> None:
    if argv[:2] == ["car-park", "create"]:
        argv = [*argv, "--capacity", "10", "--hourly-fen", "100"]
    if argv[:2] == ["gate", "create"]:
        argv = [*argv, "--broker-dir", str(tmp_path)]
    async with runtime.pool.acquire() as conn:
        before = await conn.fetchval("SELECT count(*) FROM audit_log")
    code, error = await admin(database_url, capsys, *argv)
    assert code == 2 and error.startswith("parking admin: "), error
    async with runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == before


async def test_duplicates_and_bad_values_are_refused(
    runtime: Runtime, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = _unique("dup-")
    assert (await admin(database_url, capsys, "company", "create", "--name", name))[0] == 0
    code, error = await admin(database_url, capsys, "company", "create", "--name", name)
    assert code == 2 and "exists already" in error
    base = ["car-park", "create", "--company", name, "--name", "n", "--hourly-fen", "100"]
    for extra, words in (
        (["--code", "bad/code", "--capacity", "1"], "car park code"),
        (["--code", _unique("C"), "--capacity", "-1"], "capacity"),
        (["--code", _unique("C"), "--capacity", "1", "--lat", "30"], "--lat and --lon"),
    ):
        code, error = await admin(database_url, capsys, *base, *extra)
        assert code == 2 and words in error, error
    code, error = await admin(
        database_url,
        capsys,
        "staff",
        "create",
        "--company",
        name,
        "--email",
        "not-an-email",
        "--name",
        "x",
    )
    assert code == 2 and "e-mail" in error


async def test_the_command_line_itself(database_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARKING_")}
    env["PARKING_DATABASE_URL"] = database_url
    name = _unique("cli-")
    process = await asyncio.create_subprocess_exec(
        str(PARKING),
        "admin",
        "--json",
        "company",
        "create",
        "--name",
        name,
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    assert orjson.loads(out)["name"] == name
    process = await asyncio.create_subprocess_exec(
        str(PARKING),
        "admin",
        "company",
        "create",
        "--name",
        name,
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 2 and "exists already" in err.decode()


async def test_platform_staff_and_car_parks_never_share_a_company(
    runtime: Runtime, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The city's reviewers (role platform) sit in the platform's own company: put in a car
    park operator's, its admins would see their ownership decisions in the company's audit log
    and could disable them (review 30). Neither order is taken, and nothing is written."""
    operator = _unique("城投-")
    platform = _unique("城市平台-")
    for name in (operator, platform):
        assert (await admin(database_url, capsys, "company", "create", "--name", name))[0] == 0
    car_park = _unique("PK")
    created, _ = await admin(
        database_url,
        capsys,
        "car-park",
        "create",
        "--company",
        operator,
        "--code",
        car_park,
        "--name",
        "城东停车场",
        "--capacity",
        "10",
        "--hourly-fen",
        "500",
    )
    assert created == 0

    def staff(company: str) -> tuple[str, ...]:
        email = f"{_unique('platform-')}@example.cn"
        return (
            "staff",
            "create",
            "--company",
            company,
            "--email",
            email,
            "--name",
            "审核员",
            "--role",
            "platform",
        )

    code, error = await admin(database_url, capsys, *staff(operator))
    assert code != 0 and "runs no car parks" in error
    assert (await admin(database_url, capsys, *staff(platform)))[0] == 0
    code, error = await admin(
        database_url,
        capsys,
        "car-park",
        "create",
        "--company",
        platform,
        "--code",
        _unique("PK"),
        "--name",
        "平台停车场",
        "--capacity",
        "10",
        "--hourly-fen",
        "500",
    )
    assert code != 0 and "runs no car parks" in error
    async with runtime.pool.acquire() as conn:
        platform_staff = await conn.fetchval(
            """SELECT count(*) FROM operator_users u JOIN operators o ON o.id = u.operator_id
               WHERE o.name = ANY($1::text[]) AND u.role = 'platform'""",
            [operator, platform],
        )
        platform_parks = await conn.fetchval(
            "SELECT count(*) FROM car_parks cp JOIN operators o ON o.id = cp.operator_id"
            " WHERE o.name = $1",
            platform,
        )
    assert (platform_staff, platform_parks) == (1, 0)


async def test_a_car_park_and_platform_staff_added_at_once_to_one_company_are_not_both_taken(
    runtime: Runtime, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two admins at once: one adds a car park to a new company, the other a platform reviewer
    to it. Each checked the other's kind was absent, then added its own: both were taken (review
    31). The company is now locked while either is added, and the second is refused."""
    company = _unique("新公司-")
    assert (await admin(database_url, capsys, "company", "create", "--name", company))[0] == 0
    spec = admin_service.CarParkSpec(
        company=company,
        code=_unique("PK"),
        name="新停车场",
        capacity=10,
        tariff=Tariff.hourly(free_minutes=0, hourly_fen=500, daily_cap_fen=3000),
    )
    async with runtime.pool.acquire() as first, runtime.pool.acquire() as second:
        adding = first.transaction()
        await adding.start()
        await admin_service.create_car_park(first, "test:admin", spec, datetime.now(UTC))
        async with second.transaction():
            staff = asyncio.create_task(
                admin_service.create_staff(
                    second,
                    "test:admin",
                    company=company,
                    email=f"{_unique('p-')}@example.cn",
                    name="审核员",
                    role="platform",
                    password=None,
                )
            )
            await asyncio.sleep(0.3)  # before: it went through, not waiting for the car park
            await adding.commit()
            with pytest.raises(admin_service.AdminError, match="runs no car parks"):
                await staff
