"""One JSON error shape for the whole API: {"error": message, "field"?: name} (pki.request_errors.error_body)."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify, render_template_string, request
from werkzeug.exceptions import HTTPException

from pki.request_errors import error_body

API_PREFIXES = ("/v1/", "/api/", "/healthz")

_FRIENDLY_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{{ code }} · IoT CA Lab</title>
<link rel="stylesheet" href="{{ url_for('static', filename='app.css') }}"></head>
<body class="error-page"><main><h1>{{ code }}</h1><p>{{ message }}</p><p><a href="/">Back to the dashboard</a></p>
</main></body></html>"""


def json_error(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(error_body(message, field))
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def wants_json() -> bool:
    return request.path.startswith(API_PREFIXES) or request.accept_mimetypes.best == "application/json"


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http_error(ex: HTTPException) -> Any:
        code = ex.code or 500
        message = ex.description or ex.name
        if code == 413:
            message = "request body is larger than 64 KiB"
        # The exception's own headers (405's Allow, RFC 9110 15.5.6), except the type of the page it would render.
        headers = {key: value for key, value in ex.get_headers() if key.lower() != "content-type"}
        if wants_json():
            return json_error(code, message, headers=headers)
        return render_template_string(_FRIENDLY_PAGE, code=code, message=message), code, headers

    @app.errorhandler(Exception)
    def _unexpected(ex: Exception) -> Any:  # never a traceback to the client
        app.logger.exception("unhandled error on %s %s", request.method, request.path)
        if wants_json():
            return json_error(500, "internal error; the server log has the details")
        return render_template_string(_FRIENDLY_PAGE, code=500, message="Something went wrong."), 500
