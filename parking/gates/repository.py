import asyncpg

from gate_controller.protocol import GateAddress


async def gate_addresses(conn: asyncpg.Connection) -> list[GateAddress]:
    """Every gate of every car park, as its protocol address (car park code, gate code)."""
    rows = await conn.fetch(
        """SELECT cp.code AS lot, g.code AS gate
           FROM gates g JOIN car_parks cp ON cp.id = g.car_park_id
           ORDER BY cp.code, g.code"""
    )
    return [GateAddress(row["lot"], row["gate"]) for row in rows]
