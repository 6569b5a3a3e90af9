"""Generated configuration: the templates orthanc/orthanc.json and proxy/Caddyfile, filled in.

Both are rendered into the data directory's ``run/`` folder from the site settings, the
installation's secrets and the topology (how the parts reach each other). The native runner puts
everything on one machine: Orthanc on a loopback port, gunicorn on a unix socket. The containers of
compose.yaml describe their own topology with the environment variables read by ``Topology``.

Beside them: the page Caddy shows while the control plane does not answer (``unavailable.html``
and ``.json``, read by Caddy at each such answer, so rewriting them needs no reload), and
``settings.json``, the settings these files were rendered from: what the running processes use
(``control.apply`` keeps it current as changes are applied).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from control import dicomweb_routes, logs
from control.settings import SETTINGS, parse_modalities
from control.site import REPOSITORY, Site, write_private

ORTHANC_TEMPLATE = REPOSITORY / "orthanc" / "orthanc.json"
CADDY_TEMPLATE = REPOSITORY / "proxy" / "Caddyfile"
UNAVAILABLE_TEMPLATE = REPOSITORY / "proxy" / "unavailable.html"
OHIF_PIN = json.loads((REPOSITORY / "ohif" / "pin.json").read_text())

RUNNING_SETTINGS = "settings.json"
PORT_SETTINGS = tuple(setting.name for setting in SETTINGS if setting.listening_port)
# What Caddy answers while the control plane does not (a worker killed mid-request, gunicorn
# restarting): the portal's words rather than an empty 502.
UNAVAILABLE_MESSAGE = (
    "The portal could not finish this request: it is restarting. Please try again in a moment. "
    "Sending an upload again is safe: files already stored are reported as already in the archive."
)


@dataclass(frozen=True)
class Topology:
    """Where each part of the stack listens and how the others reach it."""

    orthanc_host: str
    orthanc_remote_access: bool
    control_listen: str
    control_upstream: str
    ohif_root: Path
    ohif_managed: bool
    # In containers the listening ports are fixed by compose.yaml, which maps the host's ports to
    # them: the portal must not move them.
    ports_fixed: bool = False

    @classmethod
    def from_environment(cls, site: Site) -> Topology:
        socket = site.run / "control.sock"
        ohif_root = os.environ.get("PACS_OHIF_ROOT")
        return cls(
            orthanc_host=os.environ.get("PACS_ORTHANC_HOST", "127.0.0.1"),
            orthanc_remote_access=os.environ.get("PACS_ORTHANC_REMOTE_ACCESS", "") == "1",
            control_listen=os.environ.get("PACS_CONTROL_LISTEN", f"unix:{socket}"),
            control_upstream=os.environ.get("PACS_CONTROL_UPSTREAM", f"unix/{socket}"),
            ohif_root=Path(ohif_root) if ohif_root else viewer_directory(site),
            # With PACS_OHIF_ROOT the viewer comes from elsewhere (the caddy image); else set-up fetches it.
            ohif_managed=not ohif_root,
            ports_fixed=os.environ.get("PACS_PORTS_FIXED", "") == "1",
        )


def viewer_directory(site: Site) -> Path:
    """Where set-up unpacks the pinned OHIF build."""
    return site.cache / f"ohif-{OHIF_PIN['version']}" / "dist"


def orthanc_url(settings: dict[str, Any], topology: Topology) -> str:
    return f"http://{topology.orthanc_host}:{settings['orthanc_http_port']}"


# Content security policies. The portal's pages load nothing but their own files: no inline script
# or style anywhere. The OHIF viewer needs more: web assembly codecs, web workers and inline styles
# of its own, blob: images and documents (a PDF report shows in a frame).
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# The build's index.html carries two small inline scripts: they are allowed by their hashes, pinned
# with the build in ohif/pin.json (a test checks them against the unpacked build).
VIEWER_POLICY = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval' "
    + " ".join(f"'{digest}'" for digest in OHIF_PIN["inline_script_hashes"])
    + "; worker-src 'self' blob:; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
    "connect-src 'self' blob: data:; media-src 'self' blob:; frame-src 'self' blob:; "
    "object-src 'self' blob:; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)

_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def _fill(node: Any, values: dict[str, Any]) -> Any:
    """Replace ``${name}`` in every string of a parsed JSON document.

    A string that is exactly one placeholder takes the value with its type (a port stays a number,
    a flag a boolean); placeholders inside longer strings are replaced by text. An unknown name is
    an error rather than an empty value.
    """
    if isinstance(node, dict):
        return {_fill(key, values): _fill(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_fill(item, values) for item in node]
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        if whole:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), node)
    return node


def orthanc_modalities(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Orthanc's ``DicomModalities`` from the ``dicom_modalities`` setting, named by AE title."""
    return {
        modality.aet: modality.as_orthanc() for modality in parse_modalities(settings["dicom_modalities"])
    }


def render_orthanc(site: Site, settings: dict[str, Any], topology: Topology) -> str:
    template = json.loads(ORTHANC_TEMPLATE.read_text())
    values = {
        "dicom_aet": settings["dicom_aet"],
        "dicom_port": settings["dicom_port"],
        "orthanc_http_port": settings["orthanc_http_port"],
        "remote_access": topology.orthanc_remote_access,
        "orthanc_user": site.secrets.orthanc_user,
        "orthanc_password": site.secrets.orthanc_password,
        "storage": str(site.orthanc_storage),
        "worklists": str(site.worklists),
        "dicom_modalities": orthanc_modalities(settings),
        "default_encoding": settings["default_encoding"],
        # Registered modalities store under their own registration (AE title and address, as
        # DicomCheckModalityHost checks them); this opens storing to any caller besides.
        "always_allow_store": settings["dicom_store_from"] == "any",
    }
    return json.dumps(_fill(template, values), indent=2) + "\n"


def render_caddy(site: Site, settings: dict[str, Any], topology: Topology) -> str:
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - a Caddyfile, not HTML
    )
    template = environment.from_string(CADDY_TEMPLATE.read_text())
    credentials = f"{site.secrets.orthanc_user}:{site.secrets.orthanc_password}".encode()
    certificate = site.secrets_dir / "tls" / "site.crt"
    return template.render(
        orthanc_upstream=f"{topology.orthanc_host}:{settings['orthanc_http_port']}",
        orthanc_authorization="Basic " + base64.b64encode(credentials).decode(),
        ssl=bool(settings["ssl_enabled"]),
        hsts_include_subdomains=bool(settings["hsts_include_subdomains"]),
        web_server_name=settings["web_server_name"],
        certificate=certificate,
        certificate_fingerprint=(
            hashlib.sha256(certificate.read_bytes()).hexdigest()[:16] if certificate.exists() else "none"
        ),
        key=site.secrets_dir / "tls" / "site.key",
        page_policy=PAGE_POLICY,
        viewer_policy=VIEWER_POLICY,
        admin_socket=site.run / "caddy-admin.sock",
        run=site.run,
        logs=site.logs,
        log_to_journal=logs.to_journal(),
        log_roll_mb=logs.max_bytes() // logs.MB,
        log_keep=logs.keep(),
        web_port=settings["web_port"],
        ohif_root=topology.ohif_root,
        control_upstream=topology.control_upstream,
        dicomweb_routes=dicomweb_routes.TO_CONTROL_PLANE,
        dicomweb_gate=dicomweb_routes.GATE,
        dicomweb_bulk=dicomweb_routes.BULK_DATA,
    )


def render_unavailable(settings: dict[str, Any]) -> tuple[str, str]:
    """The page (HTML) and the JSON answer Caddy gives while the control plane does not answer."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=True)
    page = environment.from_string(UNAVAILABLE_TEMPLATE.read_text()).render(
        institution=settings["institution"], department=settings["department"], message=UNAVAILABLE_MESSAGE
    )
    answer = {"error": "The portal is restarting", "message": UNAVAILABLE_MESSAGE, "status": 503}
    return page, json.dumps(answer) + "\n"


def write_unavailable(site: Site, settings: dict[str, Any]) -> None:
    page, answer = render_unavailable(settings)
    write_private(site.run / "unavailable.html", page)
    write_private(site.run / "unavailable.json", answer)


def running_settings(site: Site) -> dict[str, Any] | None:
    """The settings the files in ``run/`` were rendered from, or None before the first start."""
    try:
        return json.loads((site.run / RUNNING_SETTINGS).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_running_settings(site: Site, settings: dict[str, Any]) -> None:
    write_private(site.run / RUNNING_SETTINGS, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def write_all(site: Site, settings: dict[str, Any], topology: Topology) -> None:
    """Render every generated file into ``run/``, and say which settings they hold."""
    write_private(site.run / "orthanc.json", render_orthanc(site, settings, topology))
    write_private(site.run / "Caddyfile", render_caddy(site, settings, topology))
    write_unavailable(site, settings)
    write_running_settings(site, settings)
