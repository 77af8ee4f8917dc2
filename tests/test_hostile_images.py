"""Hostile images at the lane's plate reading (review 27): each is an unreadable frame, answered
once, refused before it costs memory. Memory-hungry cases run in a child process under an
address-space limit, so a regression fails the test instead of the machine."""

import base64
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from parking.runtime import Runtime
from tests.conftest import Lot, eventually
from tests.gates import GateProbe

FIXTURES = Path(__file__).parent / "fixtures"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _blank_png(width: int, height: int, *, rows: bool = True) -> bytes:
    """A black 1-bit PNG of that size: a few KB for hundreds of megapixels. Without `rows`, the
    header alone (the decoder learns the size, then runs out of data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\0" * ((width + 7) // 8 + 1)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height if rows else 1)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bounded(code: str, limit_bytes: int, timeout_s: float = 120) -> str:
    """Runs `code` in a child Python under an address-space limit; its stdout."""
    prelude = (
        f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, {limit_bytes}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=Path(__file__).parent.parent,
    )
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]


async def _dead_letter_reason(runtime: Runtime, lot: Lot) -> str | None:
    async with runtime.pool.acquire() as conn:
        return await conn.fetchval(
            "SELECT reason FROM dead_letters WHERE topic LIKE $1",
            f"{runtime.lanes.topics.root}/{lot.code}/%",
        )


async def test_a_frame_declaring_more_pixels_than_the_decoder_allows_is_answered_once(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """69 bytes declaring 40000×40000 pixels: OpenCV refused it with cv2.error, which is no
    ValueError, so the pool's read raised through the lane: no command, no ack, no dead letter,
    and the gate resent it for ever. Now an unreadable frame (held for a person), answered like
    any other bad image."""
    bomb = _blank_png(40_000, 40_000, rows=False)
    assert len(bomb) < 100
    capture = gate.capture("out", None).model_copy(update={"image": _b64(bomb)})
    failures = runtime.lanes.stats.failures
    await gate.send(lot.code, "out1", capture)

    async def answered() -> bool | None:
        key = str(capture.capture_id)
        if gate.acks[key] or await _dead_letter_reason(runtime, lot) is not None:
            return True
        return None

    try:
        await eventually(answered, timeout_s=30)
    except (AssertionError, TimeoutError):
        pytest.fail(
            "a 69-byte frame made the lane fail the capture "
            f"({runtime.lanes.stats.failures - failures} failure(s)), unanswered: resent for ever"
        )
    assert runtime.lanes.stats.failures == failures


@pytest.mark.parametrize(
    ("width", "height"),
    [(12_000, 12_000), (30_000, 30_000)],
)
def test_a_decompression_bomb_is_refused_before_it_is_decoded(
    width: int, height: int, tmp_path: Path
) -> None:
    """A black PNG of 17 KB (12000²) or 109 KB (30000², well under the 512 KB capture cap)
    decodes to 432 MB or 2.7 GB of BGR in a pool process; the scene read then makes a float32
    copy four times that (an 8000² black frame, 8 KB, cost 17 s and 3.2 GB of RSS). Nothing caps
    a frame's pixels before decoding. `decode_image` refuses it (ValueError) from its header."""
    bomb = _blank_png(width, height)
    assert len(bomb) < 120_000
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    out = _bounded(
        f"""
            import time
            from plate_recognition.pipeline import decode_image
            start = time.perf_counter()
            try:
                image = decode_image(open({str(path)!r}, "rb").read())
                print("decoded", image.shape, round(time.perf_counter() - start, 2))
            except ValueError as exc:
                print("refused", round(time.perf_counter() - start, 2))
            except Exception as exc:
                print("raised", type(exc).__name__, str(exc)[:120])
            """,
        1536 * 1024 * 1024,
    )
    assert out.startswith("refused"), out


def test_a_thin_crop_is_read_in_bounded_memory() -> None:
    """An 8×8000 strip (a 190 KB PNG, within the capture cap) is taken for a plate crop
    (`guess_kind`: wide and short) and PP-OCR resizes it to 48×48000: its attention needs memory
    quadratic in the width (8×4000 peaked near 1 GB, 8×30000 asked onnxruntime for 11 GB and
    raised its own error after 15 s, which `_read_frame` did not catch either). Under 2 GB it
    comes back unreadable, not raising: no plate line is wider than a few heights."""
    out = _bounded(
        """
        import numpy as np, cv2
        from plate_recognition.pipeline import recognise
        strip = np.random.default_rng(0).integers(0, 255, (8, 8000, 3), dtype=np.uint8)
        data = cv2.imencode(".png", strip)[1].tobytes()
        assert len(data) < 380_000
        try:
            result = recognise(data)
            print("read", result.kind, len(result.candidates))
        except ValueError:
            print("refused")
        except Exception as exc:
            print("raised", type(exc).__module__, type(exc).__name__)
        """,
        2 * 1024 * 1024 * 1024,
        timeout_s=180,
    )
    assert out.startswith(("read", "refused")), out
