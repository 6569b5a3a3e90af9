"""The control plane's application factory.

gunicorn runs ``control.app:create_app()``; tests build apps on a temporary data directory with
``create_app({"DATA_DIR": tmp_path})``. Extensions are created unbound in ``control.extensions``
and bound here; each audience has its blueprint: public pages, sign-in, and (in later modules)
query/retrieve, admin, patients' token pages, the DICOMweb gate and uploads.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Flask, g, request
from flask.sessions import SecureCookieSessionInterface
from werkzeug.middleware.proxy_fix import ProxyFix

from control import __version__, access, configs, errors, formatting
from control.archive_version import ArchiveVersions
from control.dicomweb.fast import QuickGate
from control.dicomweb.frames import FrameSource
from control.extensions import csrf, login_manager
from control.orthanc import Orthanc
from control.site import Site


class SiteSessionInterface(SecureCookieSessionInterface):
    """Session cookies marked Secure exactly when the site serves https (a setting that can change
    while the portal runs)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(g.get("settings", {}).get("ssl_enabled"))


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the control plane for the installation in ``DATA_DIR`` (default: ``PACS_DATA``)."""
    app = Flask(__name__)
    app.config.from_mapping(config or {})
    site = Site(app.config.get("DATA_DIR"))
    app.extensions["site"] = site
    app.config.update(
        SECRET_KEY=site.secrets.session_key,
        SESSION_COOKIE_NAME="pacs_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        WTF_CSRF_TIME_LIMIT=None,
        MAX_FORM_MEMORY_SIZE=64 * 1024,
    )
    app.config.from_mapping(config or {})
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.session_interface = SiteSessionInterface()

    settings = site.load_settings()
    topology = configs.Topology.from_environment(site)
    app.extensions["orthanc"] = Orthanc(
        configs.orthanc_url(settings, topology),
        site.secrets.orthanc_user,
        site.secrets.orthanc_password,
    )
    app.extensions["archive_version"] = ArchiveVersions(app.extensions["orthanc"])
    app.extensions["frames"] = FrameSource(app.extensions["orthanc"], app.extensions["archive_version"])

    # Caddy is the only listener and the only client of this app: trust its one forwarded hop.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    # The viewer's frames, and Caddy's questions about its other requests, are answered before
    # Flask when the answer is plainly yes (see the module).
    app.wsgi_app = QuickGate(app.wsgi_app, app)  # type: ignore[method-assign]

    csrf.init_app(app)
    login_manager.init_app(app)

    from control import admin, auth, dicomweb, public, query, tokens, uploads

    app.register_blueprint(public.bp)
    app.register_blueprint(auth.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(tokens.bp)
    app.register_blueprint(dicomweb.bp)
    app.register_blueprint(query.bp)
    app.register_blueprint(uploads.bp)
    errors.init_app(app)
    formatting.init_app(app)

    @app.before_request
    def load_site_settings() -> None:
        # Settings are read per request, so a change made by any instance shows at once.
        g.settings = site.load_settings()

    access.init_app(app)

    @app.context_processor
    def page_context() -> dict[str, Any]:
        return {
            "site_settings": g.get("settings") or site.load_settings(),
            "client_address": request.remote_addr,
            "portal_version": __version__,
            "current_year": dt.date.today().year,
        }

    return app
