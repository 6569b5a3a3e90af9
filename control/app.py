"""The control plane's application factory.

gunicorn runs ``control.app:create_app()``; tests build apps on a temporary data directory with
``create_app({"DATA_DIR": tmp_path})``. Extensions are created unbound in ``control.extensions``
and bound here; each audience has its blueprint: public pages, sign-in, and (in later modules)
query/retrieve, admin, patients' token pages, the DICOMweb gate and uploads.
"""

from __future__ import annotations

import datetime as dt
from functools import partial
from typing import Any

from flask import Flask, g, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.middleware.proxy_fix import ProxyFix

from control import __version__, access, errors, formatting, nodes, services
from control.archive_version import ArchiveVersions
from control.cookies import SiteSessionInterface
from control.dicomweb.fast import QuickGate
from control.dicomweb.frames import FrameSource
from control.extensions import csrf, login_manager
from control.runtime import configs
from control.site import Site
from control.tokens import shared
from control.watch import ArchiveWatch


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the control plane for the installation in ``DATA_DIR`` (default: ``PACS_DATA``)."""
    app = Flask(__name__)
    app.config.from_mapping(config or {})
    site = Site(app.config.get("DATA_DIR"))
    app.config.update(
        SECRET_KEY=site.secrets.session_key,
        # The cookie's name and Secure flag follow the scheme (control.cookies).
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        WTF_CSRF_TIME_LIMIT=None,
        # Flask-WTF's https check wants a Referer, which patients' pages never send; control.csrf
        # checks the request's origin instead.
        WTF_CSRF_SSL_STRICT=False,
        MAX_FORM_MEMORY_SIZE=64 * 1024,
    )
    app.config.from_mapping(config or {})
    # Answers keep the order their code gives (Flask would sort the keys).
    json_provider = DefaultJSONProvider(app)
    json_provider.sort_keys = False
    app.json = json_provider
    app.session_interface = SiteSessionInterface()

    settings = site.load_settings()
    topology = configs.Topology.from_environment(site)
    # Every node of the archive behind one client: reads in turn, writes to the writer (control.nodes).
    archive = nodes.connect(site, settings, topology)
    versions = ArchiveVersions(archive)
    services.install(
        app,
        site=site,
        archive=archive,
        versions=versions,
        frames=FrameSource(archive, versions),
        # Which archive studies hold a Study Instance UID now, for the DICOMweb gate (both its ways).
        study_holders=partial(shared.holders, archive),
        # Started in each gunicorn worker (control.runtime.gunicorn_conf); tests run rounds of it themselves.
        watch=ArchiveWatch(site, archive),
    )

    # Caddy is the only listener and the only client of this app: trust its one forwarded hop.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]  # Flask's way to add middleware
    # The viewer's frames, and Caddy's questions about its other requests, are answered before
    # Flask when the answer is plainly yes (see the module).
    app.wsgi_app = QuickGate(app.wsgi_app, app)  # type: ignore[method-assign]  # Flask's way to add middleware

    csrf.init_app(app)
    login_manager.init_app(app)

    from control import admin, auth, desktop, dicomweb, metrics, public, query, tokens, uploads, viewer

    # Outermost, so that the gate's quick answers are counted too (control.metrics).
    app.wsgi_app = metrics.Counting(app.wsgi_app)  # type: ignore[method-assign]  # Flask's way to add middleware

    app.register_blueprint(public.bp)
    app.register_blueprint(auth.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(tokens.bp)
    app.register_blueprint(dicomweb.bp)
    app.register_blueprint(desktop.bp)
    app.register_blueprint(query.bp)
    app.register_blueprint(uploads.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(uploads.gate)
    app.register_blueprint(viewer.bp)
    errors.init_app(app)
    formatting.init_app(app)

    @app.before_request
    def load_site_settings() -> None:
        # Settings are read per request, so a change made by any instance shows at once.
        g.settings = site.load_settings()

    access.init_app(app)

    @app.after_request
    def forget_https_when_ssl_is_off(response):
        # Between SSL turned off and the web front's swap, pages still go out over https: browsers
        # that get them drop this name's HSTS, else they would never reach the plain http portal.
        settings = g.get("settings")
        if request.is_secure and settings is not None and not settings.ssl_enabled:
            response.headers["Strict-Transport-Security"] = "max-age=0"
        return response

    @app.context_processor
    def page_context() -> dict[str, Any]:
        return {
            "site_settings": g.get("settings") or site.load_settings(),
            "client_address": request.remote_addr,
            "portal_version": __version__,
            "current_year": dt.date.today().year,
        }

    return app
