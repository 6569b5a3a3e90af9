"""Error answers: a page for browsers, JSON for scripts and DICOMweb clients, never a traceback."""

from __future__ import annotations

from flask import Flask, jsonify, make_response, render_template, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException, InternalServerError

from control import csrf
from control.orthanc import OrthancUnavailable

MESSAGES = {
    400: ("Bad request", "The request could not be understood."),
    401: ("Sign-in needed", "Please sign in to continue."),
    403: ("Not allowed", "Your account may not open this page."),
    404: ("Not found", "There is nothing at this address."),
    405: ("Not allowed", "This address does not take that kind of request."),
    413: ("Too large", "What you sent is larger than this server accepts."),
    429: ("Too many attempts", "Too many attempts from here; please wait and try again."),
    500: ("Something went wrong", "The server could not complete the request; it has been logged."),
    503: (
        "The archive is not reachable",
        "The image archive behind this portal does not answer right now. Please try again in a "
        "few minutes; if it persists, contact the site's administrator.",
    ),
}


def wants_json() -> bool:
    if request.args.get("format") == "json":
        return True
    if request.path.startswith(("/dicom-web", "/wado", "/api/", "/healthz")):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return (
        best == "application/json" and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]
    )


def error_response(status: int, detail: str | None = None):
    title, message = MESSAGES.get(status, (f"Error {status}", ""))
    message = detail or message
    if wants_json():
        return jsonify({"error": title, "message": message, "status": status}), status
    return render_template("errors/error.html", status=status, title=title, message=message), status


def init_app(app: Flask) -> None:
    @app.errorhandler(OrthancUnavailable)
    def archive_unreachable(error: OrthancUnavailable):
        app.logger.warning("Orthanc unreachable: %s", error)
        return error_response(503)

    @app.errorhandler(CSRFError)
    def csrf_refused(error: CSRFError):
        if error.description == csrf.FOREIGN:
            return error_response(400, csrf.FOREIGN)
        return error_response(
            400, "This form has expired or did not come from this site. Reload the page and try again."
        )

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if isinstance(error, InternalServerError):
            return error_response(500)
        body, status = error_response(error.code or 500)
        response = make_response(body, status)
        if error.code == 405 and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        app.logger.exception("Unexpected error on %s %s", request.method, request.path)
        return error_response(500)
