"""Generated configuration: the templates orthanc/orthanc.json and proxy/Caddyfile, filled in.

Both are rendered into the data directory's ``run/`` folder from the site settings, the
installation's secrets and the topology (how the parts reach each other). The native runner puts
everything on one machine: Orthanc on a loopback port, gunicorn on a unix socket. The containers of
compose.yaml describe their own topology with the environment variables read by ``Topology``.

A larger site runs several archive nodes (Orthancs on one PostgreSQL index, sharing the storage
and worklist folders) and several control planes, all behind the one Caddy (see README:
Several nodes). Every node gets the same configuration but for its ports when several run on one
machine; ``run/topology.json`` records how many run and where the archive's index is, so that the
commands run beside a running portal (``./pacs config set``) reach all of them.

Beside them: the page Caddy shows while the control plane does not answer (``unavailable.html``
and ``.json``, read by Caddy at each such answer, so rewriting them needs no reload), and
``settings.json``, the settings these files were rendered from: what the running processes use
(``control.runtime.apply`` keeps it current as changes are applied).
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
from urllib.parse import quote, urlencode

import jinja2
import sqlalchemy as sa

from control import dicomweb_routes
from control.runtime import files, logs
from control.settings import SETTINGS, SiteSettings, parse_modalities
from control.site import REPOSITORY, Site, write_private

ORTHANC_TEMPLATE = REPOSITORY / "orthanc" / "orthanc.json"
CADDY_TEMPLATE = REPOSITORY / "proxy" / "Caddyfile"
UNAVAILABLE_TEMPLATE = REPOSITORY / "proxy" / "unavailable.html"
OHIF_PIN = json.loads((REPOSITORY / "ohif" / "pin.json").read_text())

RUNNING_SETTINGS = "settings.json"
RUNNING_TOPOLOGY = "topology.json"
# Seconds between Caddy's checks of each archive node (and how long a node that failed a request
# is left alone by the control plane before it is tried again, see control.nodes).
HEALTH_INTERVAL = 2
PORT_SETTINGS = tuple(setting.name for setting in SETTINGS if setting.listening_port)
# What Caddy answers while the control plane does not (a worker killed mid-request, gunicorn
# restarting): the portal's words rather than an empty 502.
UNAVAILABLE_MESSAGE = (
    "The portal could not finish this request: it is restarting. Please try again in a moment. "
    "Sending an upload again is safe: files already stored are reported as already in the archive."
)


@dataclass(frozen=True)
class ArchiveNode:
    """One Orthanc of the archive, as the control plane and Caddy reach it."""

    number: int  # 1, 2, ...: the first is the one that takes writes while it answers
    host: str
    http_port: int
    dicom_port: int

    @property
    def name(self) -> str:
        """``orthanc`` for the first node (as a single-node portal names it), then ``orthanc-2``..."""
        return "orthanc" if self.number == 1 else f"orthanc-{self.number}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


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
    # Archive nodes and control planes the native runner starts on this machine.
    nodes: int = 1
    # Hosts of the archive nodes when each is a machine (or container) of its own, all on the same
    # ports; else every node is on ``orthanc_host``, on ports one after the other.
    orthanc_hosts: tuple[str, ...] = ()
    # Every control plane, as Caddy reaches it (``control_upstream`` is the first).
    control_upstreams: tuple[str, ...] = ()
    # "sqlite" (the single-node default: Orthanc's own index file) or "postgresql".
    archive_index: str = "sqlite"

    @classmethod
    def from_environment(cls, site: Site) -> Topology:
        recorded = running_topology(site)
        nodes = int(os.environ.get("PACS_NODES") or recorded.get("nodes", 1))
        hosts = tuple(os.environ.get("PACS_ORTHANC_HOST", "127.0.0.1").split())
        sockets = [files.control_socket(site, number) for number in range(1, nodes + 1)]
        upstreams = tuple(
            os.environ.get("PACS_CONTROL_UPSTREAM", "").split() or [f"unix/{path}" for path in sockets]
        )
        ohif_root = os.environ.get("PACS_OHIF_ROOT")
        return cls(
            orthanc_host=hosts[0],
            orthanc_remote_access=os.environ.get("PACS_ORTHANC_REMOTE_ACCESS", "") == "1",
            control_listen=os.environ.get("PACS_CONTROL_LISTEN", f"unix:{sockets[0]}"),
            control_upstream=upstreams[0],
            ohif_root=Path(ohif_root) if ohif_root else viewer_directory(site),
            # With PACS_OHIF_ROOT the viewer comes from elsewhere (the caddy image); else set-up fetches it.
            ohif_managed=not ohif_root,
            ports_fixed=os.environ.get("PACS_PORTS_FIXED", "") == "1",
            nodes=max(nodes, len(hosts)),
            orthanc_hosts=hosts if len(hosts) > 1 else (),
            control_upstreams=upstreams,
            archive_index=recorded.get("archive_index", "sqlite"),
        )


def archive_nodes(settings: SiteSettings, topology: Topology) -> list[ArchiveNode]:
    """Every archive node, the first (the writer while it answers) first.

    Nodes of one machine take the archive's ports and the ports after them: node 2 listens on
    ``orthanc_http_port`` + 1 and ``dicom_port`` + 1, and so on.
    """
    http_port, dicom_port = settings.orthanc_http_port, settings.dicom_port
    if topology.orthanc_hosts:
        return [
            ArchiveNode(number, host, http_port, dicom_port)
            for number, host in enumerate(topology.orthanc_hosts, start=1)
        ]
    return [
        ArchiveNode(number, topology.orthanc_host, http_port + number - 1, dicom_port + number - 1)
        for number in range(1, topology.nodes + 1)
    ]


def running_topology(site: Site) -> dict[str, Any]:
    """What the last start recorded in ``run/topology.json`` (nothing before a first start)."""
    try:
        return json.loads((site.run / RUNNING_TOPOLOGY).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def write_running_topology(site: Site, topology: Topology) -> None:
    recorded = {"nodes": topology.nodes, "archive_index": topology.archive_index}
    write_private(site.run / RUNNING_TOPOLOGY, json.dumps(recorded, indent=2) + "\n")


def viewer_directory(site: Site) -> Path:
    """Where set-up unpacks the pinned OHIF build."""
    return site.cache / f"ohif-{OHIF_PIN['version']}" / "dist"


def orthanc_url(settings: SiteSettings, topology: Topology) -> str:
    return f"http://{topology.orthanc_host}:{settings.orthanc_http_port}"


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


def orthanc_modalities(settings: SiteSettings) -> dict[str, dict[str, Any]]:
    """Orthanc's ``DicomModalities`` from the ``dicom_modalities`` setting, named by AE title."""
    return {modality.aet: modality.as_orthanc() for modality in parse_modalities(settings.dicom_modalities)}


# Orthanc's PostgreSQL index plugin (Debian's orthanc-postgresql 4.0). Every node of the archive
# writes through it; the files stay on the shared filesystem (EnableStorage false), where they can
# be read and backed up as files. See README: Several nodes.
POSTGRESQL_INDEX_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"


def archive_database_url(site: Site) -> str:
    """The PostgreSQL database of Orthanc's index, as libpq takes it (``postgresql://...``).

    ``PACS_ARCHIVE_DATABASE_URL``, or the control plane's own server and credentials with the
    database name followed by ``_archive``: Orthanc's plugin 4.0 keeps its tables in the ``public``
    schema of a database of its own (it calls a database with another schema first "corrupted").
    """
    chosen = os.environ.get("PACS_ARCHIVE_DATABASE_URL")
    url = sa.engine.make_url(chosen or site.database_url)
    if url.get_backend_name() != "postgresql":
        raise ValueError(
            "an archive on PostgreSQL needs a PostgreSQL server: set PACS_DATABASE_URL (the control "
            "plane's database, whose server then holds the archive's index too) or "
            "PACS_ARCHIVE_DATABASE_URL"
        )
    if not chosen:
        if not url.database:
            raise ValueError(
                "PACS_DATABASE_URL names no database (nothing after the server's address): the "
                "archive's index goes into the database of that name followed by _archive, so name "
                "the control plane's database there (.../pacs), or set PACS_ARCHIVE_DATABASE_URL"
            )
        url = url.set(database=f"{url.database}_archive")
    return libpq_url(url)


def libpq_url(url: sa.URL) -> str:
    """``url`` as libpq (psycopg, Orthanc's plugin) takes it: ``postgresql://``, with the user name
    and password percent-encoded whole. SQLAlchemy's own rendering leaves spaces as they are,
    which libpq refuses."""
    credentials = ""
    if url.username:
        credentials = quote(url.username, safe="")
        if url.password:
            credentials += ":" + quote(str(url.password), safe="")
        credentials += "@"
    address = url.host or ""
    if ":" in address:
        address = f"[{address}]"
    if url.port:
        address += f":{url.port}"
    query = f"?{urlencode(url.query, doseq=True)}" if url.query else ""
    return f"postgresql://{credentials}{address}/{quote(url.database or '', safe='')}{query}"


def render_orthanc(
    site: Site, settings: SiteSettings, topology: Topology, node: ArchiveNode | None = None
) -> str:
    """Orthanc's configuration for ``node`` (the first by default)."""
    node = node or archive_nodes(settings, topology)[0]
    template = json.loads(ORTHANC_TEMPLATE.read_text())
    values = {
        "dicom_aet": settings.dicom_aet,
        "dicom_port": node.dicom_port,
        "orthanc_http_port": node.http_port,
        "remote_access": topology.orthanc_remote_access,
        "orthanc_user": site.secrets.orthanc_user,
        "orthanc_password": site.secrets.orthanc_password,
        "storage": str(site.orthanc_storage),
        "worklists": str(site.worklists),
        "dicom_modalities": orthanc_modalities(settings),
        "default_encoding": settings.default_encoding,
        # Registered modalities store under their own registration (AE title and address, as
        # DicomCheckModalityHost checks them); this opens storing to any caller besides.
        "always_allow_store": settings.dicom_store_from == "any",
    }
    configuration = _fill(template, values)
    if topology.archive_index == "postgresql":
        configuration["Plugins"].append(POSTGRESQL_INDEX_PLUGIN)
        configuration["PostgreSQL"] = {
            "EnableIndex": True,
            "EnableStorage": False,
            "ConnectionUri": archive_database_url(site),
            # Lock true (the plugin's default) lets one Orthanc only use the database.
            "Lock": False,
            # Plugin 4.0 runs every write SERIALIZABLE: with more connections a node's own stores
            # collide and fail (44 stores/s and 4 failures in 2,000 with 5 connections; 120/s and
            # none with 1, README: Several nodes).
            "IndexConnectionsCount": 1,
            # A node that starts while PostgreSQL is down waits for it (30 x 2 s) rather than exit;
            # a running node reconnects by itself, answering 503 meanwhile.
            "MaximumConnectionRetries": 30,
            "ConnectionRetryInterval": 2,
        }
    return json.dumps(configuration, indent=2) + "\n"


def orthanc_configuration_file(site: Site, node: ArchiveNode) -> Path:
    """Where ``node``'s configuration is rendered: ``run/orthanc.json``, ``run/orthanc-2.json``..."""
    return site.run / f"{node.name}.json"


def write_orthanc_configurations(site: Site, settings: SiteSettings, topology: Topology) -> None:
    """Render every archive node's configuration into ``run/``."""
    for node in archive_nodes(settings, topology):
        write_private(orthanc_configuration_file(site, node), render_orthanc(site, settings, topology, node))


def render_caddy(site: Site, settings: SiteSettings, topology: Topology) -> str:
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - a Caddyfile, not HTML
    )
    template = environment.from_string(CADDY_TEMPLATE.read_text())
    credentials = f"{site.secrets.orthanc_user}:{site.secrets.orthanc_password}".encode()
    certificate = site.secrets_dir / "tls" / "site.crt"
    return template.render(
        orthanc_upstreams=" ".join(
            f"{node.host}:{node.http_port}" for node in archive_nodes(settings, topology)
        ),
        orthanc_authorization="Basic " + base64.b64encode(credentials).decode(),
        ssl=bool(settings.ssl_enabled),
        hsts_include_subdomains=bool(settings.hsts_include_subdomains),
        web_server_name=settings.web_server_name,
        certificate=certificate,
        certificate_fingerprint=(
            hashlib.sha256(certificate.read_bytes()).hexdigest()[:16] if certificate.exists() else "none"
        ),
        key=site.secrets_dir / "tls" / "site.key",
        page_policy=PAGE_POLICY,
        viewer_policy=VIEWER_POLICY,
        admin_socket=files.caddy_admin_socket(site),
        run=site.run,
        logs=site.logs,
        log_to_journal=logs.to_journal(),
        log_roll_mb=logs.max_bytes() // logs.MB,
        log_keep=logs.keep(),
        web_port=settings.web_port,
        ohif_root=topology.ohif_root,
        control_upstreams=" ".join(topology.control_upstreams),
        balanced=len(topology.control_upstreams) > 1 or topology.nodes > 1,
        health_interval=HEALTH_INTERVAL,
        dicomweb_routes=dicomweb_routes.TO_CONTROL_PLANE,
        dicomweb_gate=dicomweb_routes.GATE,
        dicomweb_bulk=dicomweb_routes.BULK_DATA,
    )


def render_unavailable(settings: SiteSettings) -> tuple[str, str]:
    """The page (HTML) and the JSON answer Caddy gives while the control plane does not answer."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=True)
    page = environment.from_string(UNAVAILABLE_TEMPLATE.read_text()).render(
        institution=settings.institution, department=settings.department, message=UNAVAILABLE_MESSAGE
    )
    answer = {"error": "The portal is restarting", "message": UNAVAILABLE_MESSAGE, "status": 503}
    return page, json.dumps(answer) + "\n"


def write_unavailable(site: Site, settings: SiteSettings) -> None:
    page, answer = render_unavailable(settings)
    write_private(site.run / "unavailable.html", page)
    write_private(site.run / "unavailable.json", answer)


def running_settings(site: Site) -> dict[str, Any] | None:
    """The settings the files in ``run/`` were rendered from, or None before the first start."""
    try:
        return json.loads((site.run / RUNNING_SETTINGS).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_running_settings(site: Site, settings: SiteSettings) -> None:
    write_private(
        site.run / RUNNING_SETTINGS, json.dumps(settings.as_dict(), indent=2, sort_keys=True) + "\n"
    )


def write_all(site: Site, settings: SiteSettings, topology: Topology) -> None:
    """Render every generated file into ``run/``, and say which settings they hold."""
    write_orthanc_configurations(site, settings, topology)
    write_running_topology(site, topology)
    write_private(files.caddyfile(site), render_caddy(site, settings, topology))
    write_unavailable(site, settings)
    write_running_settings(site, settings)
