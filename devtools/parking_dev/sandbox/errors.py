"""The provider's error answers: `{"error": code, "message": text}` with an HTTP status."""

from fastapi.responses import JSONResponse


def error(status_code: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status_code)


def not_found(what: str) -> JSONResponse:
    return error(404, "not_found", f"no {what}")
