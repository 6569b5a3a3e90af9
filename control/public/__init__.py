"""Pages anyone may open: the branded landing page, the downloader (one file, or a package for pip:
``installer``) and the health check."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, jsonify, render_template, send_file
from flask_login import current_user

from control import __version__, services
from control.orthanc import OrthancError, OrthancUnavailable
from control.site import REPOSITORY

bp = Blueprint("public", __name__)

DOWNLOADER_SCRIPT = REPOSITORY / "downloader" / "pacs_download.py"


@bp.route("/")
def index():
    archive = None
    if current_user.is_authenticated:
        # What a signed-in user first wants to know: is the archive there, and what does it hold.
        archive = services.archive().get_json("/statistics")
    return render_template("public/index.html", archive=archive)


@bp.get("/downloader/pacs_download.py")
def downloader_script():
    """The downloader as one file, for anyone (it needs only Python 3.9 or later); the query pages
    show the command line that runs it."""
    return send_file(
        DOWNLOADER_SCRIPT, mimetype="text/x-python", as_attachment=True, download_name="pacs_download.py"
    )


@bp.route("/healthz")
def healthz():
    """The state of the archive, the control plane and its database, for monitoring (no secrets)."""
    report: dict = {"control": {"ok": True, "version": __version__}}
    try:
        with services.engine().connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        report["database"] = {"ok": True}
    except sa.exc.SQLAlchemyError as error:
        report["database"] = {"ok": False, "error": type(error).__name__}
    archive = services.archive()
    nodes = {name: _node_health(orthanc) for name, orthanc in archive.each()}
    answering = [health for health in nodes.values() if health["ok"]]
    report["orthanc"] = answering[0] if answering else next(iter(nodes.values()))
    if answering:
        try:
            # The versions of Orthanc and of its DICOMweb plugin, as the portal last asked (a minute at most).
            versions = services.archive_versions().current().describe()
            report["orthanc"] = {**report["orthanc"], **versions}
        except (OrthancUnavailable, OrthancError) as error:
            reason = "not reachable" if isinstance(error, OrthancUnavailable) else str(error)
            report["orthanc"] = {"ok": False, "error": reason}
    if len(nodes) > 1:
        # Several archive nodes: the portal serves while one answers; the others are named.
        report["nodes"] = nodes
    healthy = all(part["ok"] for part in report.values() if "ok" in part)
    report = {"status": "ok" if healthy and len(answering) == len(nodes) else "degraded", **report}
    return jsonify(report), 200 if healthy else 503


def _node_health(orthanc) -> dict:
    try:
        system = orthanc.system()
    except OrthancUnavailable:
        return {"ok": False, "error": "not reachable"}
    except OrthancError as error:
        return {"ok": False, "error": str(error)}
    return {"ok": True, "version": system.get("Version"), "aet": system.get("DicomAet")}


from control.public import installer  # noqa: E402, F401 - the module registers bp's routes
