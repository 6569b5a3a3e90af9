"""Error answers: a page for browsers, JSON for scripts and DICOMweb clients, never a traceback."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Flask, g, jsonify, make_response, render_template, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException, InternalServerError, MethodNotAllowed

from control import csrf, services
from control.extensions import login_manager
from control.orthanc import OrthancError, OrthancUnavailable

MESSAGES = {
    400: ("Bad request", "The request could not be understood."),
    401: ("Sign-in needed", "Please sign in to continue."),
    403: ("Not allowed", "Your account may not open this page."),
    404: ("Not found", "There is nothing at this address."),
    405: ("Not allowed", "This address does not take that kind of request."),
    413: ("Too large", "What you sent is larger than this server accepts."),
    429: ("Too many attempts", "Too many attempts from here; please wait and try again."),
    500: ("Something went wrong", "The server could not complete the request; it has been logged."),
    502: (
        "The archive failed",
        "The image archive behind this portal could not complete the request; it has been logged. "
        "Please try again; if it persists, contact the site's administrator.",
    ),
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


DATABASE_DOWN = (
    "The portal's database is not available",
    "The portal's own database does not answer right now (restarting, or busy with other work). "
    "Nothing was changed. Please try again in a minute; if it persists, contact the site's "
    "administrator.",
)


def error_response(status: int, detail: str | None = None, *, title: str | None = None):
    default_title, message = MESSAGES.get(status, (f"Error {status}", ""))
    title = title or default_title
    message = detail or message
    if wants_json():
        return jsonify({"error": title, "message": message, "status": status}), status
    return render_template("errors/error.html", status=status, title=title, message=message), status


def init_app(app: Flask) -> None:
    @app.errorhandler(OrthancUnavailable)
    def archive_unreachable(error: OrthancUnavailable):
        app.logger.warning("Orthanc unreachable: %s", error)
        return error_response(503)

    @app.errorhandler(OrthancError)
    def archive_failed(error: OrthancError):
        if error.status < 500:
            return unexpected(error)  # the portal asked wrongly: its own fault, logged in full
        app.logger.warning("Orthanc failed on %s %s: %s", request.method, request.path, error)
        return error_response(502)

    @app.errorhandler(sa.exc.OperationalError)
    @app.errorhandler(sa.exc.InterfaceError)
    def database_unavailable(error: sa.exc.DBAPIError):
        # PostgreSQL restarting or unreachable, SQLite locked past its wait: the request did not
        # happen (its transaction, activity row included, is rolled back), so say so plainly.
        app.logger.warning("Database unavailable on %s %s: %s", request.method, request.path, error.orig)
        # The page must not ask the database again: nobody is signed in on it, and the settings
        # are those last read.
        login_manager._update_request_context_with_user()
        g.settings = g.get("settings") or services.site().last_settings()
        title, message = DATABASE_DOWN
        response = make_response(error_response(503, message, title=title))
        response.headers["Retry-After"] = "30"
        return response

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
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        app.logger.exception("Unexpected error on %s %s", request.method, request.path)
        return error_response(500)
