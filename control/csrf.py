"""Cross-site request forgery: the page's token, and where the browser says the form came from.

Every form and script that changes something sends the token of the page it came from (Flask-WTF's
synchronizer token, kept in the session). On top of it, the browser's own word about the request's
origin is checked, as browsers really send it (Fetch standard):

- ``Sec-Fetch-Site`` (fetch metadata, sent by current browsers to https sites and to localhost):
  a request that changes something must say ``same-origin`` (or ``none``, a user's own action).
  ``same-site`` is refused too: another port of the same host is another program.
- Else ``Origin``, when it names an origin, must be the portal's own (scheme, host and port).
- ``Origin: null`` and no ``Origin`` at all leave the decision to the token. A browser sends
  ``null`` where the referrer policy is ``no-referrer``: the patients' pages, whose URL holds
  their token, keep that policy (proxy/Caddyfile) so that not even the portal's own files see the
  token in a ``Referer``. Scripts such as the downloader send neither header.

Flask-WTF's own https check (``WTF_CSRF_SSL_STRICT``) is off: it demands a same-origin ``Referer``,
which a browser never sends under ``no-referrer``, so with SSL on it refused every form of the
patients' pages. The portal's other pages send ``Referrer-Policy: same-origin``, under which
the browser sends the page's ``Origin`` with every form.

The session cookie is ``SameSite=Lax``, so a form posted from another site does not even carry it;
the checks above are for what that leaves: another port or name of the same site, and browsers
that do not honour SameSite.
"""

from __future__ import annotations

from flask import current_app, request
from flask_wtf.csrf import CSRFProtect

ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})
FOREIGN = "This form did not come from this site."


def foreign_origin() -> str | None:
    """Why the current request's browser says it comes from elsewhere, or None when it does not."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return None if fetch_site.lower() in ALLOWED_FETCH_SITES else f"Sec-Fetch-Site: {fetch_site}"
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return None
    # Browsers leave out a scheme's default port in Origin, as they do in Host (Caddy passes the
    # Host on as X-Forwarded-Host, which the app reads as request.host).
    if origin.lower() != f"{request.scheme}://{request.host}".lower():
        return f"Origin: {origin[:200]}"
    return None


class SiteCSRFProtect(CSRFProtect):
    """Flask-WTF's token check, preceded by the origin check of this module."""

    def protect(self, apply_exemptions: bool = False) -> None:
        checked = request.method in current_app.config["WTF_CSRF_METHODS"]
        if checked and not (apply_exemptions and (not request.endpoint or self._is_exempt())):
            reason = foreign_origin()
            if reason:
                current_app.logger.info(
                    "Refused a request from another site on %s (%s)", request.path, reason
                )
                self._error_response(FOREIGN)
        super().protect(apply_exemptions)
