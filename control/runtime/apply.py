"""Changing site settings: validated, stored, recorded and applied in one place.

The setup page, ``./pacs config set`` and ``config certificate``, and the worklist page's
modalities all go through ``change_settings``. It parses every value and checks what they need
together (a free port, a certificate for SSL, ports that compose.yaml fixes); counts the
transfers the change would cut, and goes on only if the caller accepted that; stores the values
with one activity event (``settings-changed``, old and new values, never a key) in one
transaction, once the running web front has checked its new configuration; then does what each
changed setting declares it needs (``Setting.effect``):

- ``NOTHING``: the control plane reads settings at every request, so the next page has them.
- ``WEB_FRONT``: the running Caddy loads its new configuration through its admin API (a unix socket
  in ``run/``), after the page's answer has gone out when a page asked (the page is itself a
  request in flight through Caddy). It is sent only when its text changed: Caddy 2.6.2 ends every
  response in progress when it loads a changed configuration, grace period or not, and even an
  unchanged one the first time after it started.
- ``ARCHIVE_API``: Orthanc is told through its REST API (``TOLD_TO_THE_ARCHIVE``: the registered
  modalities, the character set of files that name none), and its configuration file carries the
  same for its next start. Nothing is restarted.
- ``ARCHIVE_RESTART``: Orthanc's configuration file is rewritten and Orthanc restarts in place with
  it (``POST /tools/reset``), which ends what it was sending and receiving.
- ``NEXT_START``: stored only. The files in ``run/`` keep the value the processes run with
  (``run/settings.json`` says which), so that a later live change never points Caddy, or a
  restarted Orthanc, at a port nothing listens on yet.

Transfers in progress are what Caddy is proxying at that moment, read from its admin API
(``GET /reverse_proxy/upstreams``, requests in flight per upstream). A change that would reload
the web front or restart the archive while some run is refused with their number
(``TransfersInProgress``) unless the caller says to cut them: the admin decides.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from control import db, network, nodes, tls
from control.activity import Outcome, record_activity
from control.events import SettingsChangedEvent
from control.orthanc import Orthanc, OrthancError, OrthancUnavailable
from control.runtime import configs, files, unixhttp
from control.settings import BY_NAME, Effect, Modality, SiteSettings, parse_modalities
from control.site import Site, write_private

log = logging.getLogger(__name__)

APPLIED = "Applied to the running portal."


class ApplyError(RuntimeError):
    """The running portal refused the new configuration; the old one still serves."""


class SettingsRefused(ValueError):
    """Values that cannot be taken, by setting name (or ``certificate``); nothing changed."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(errors.values()))
        self.errors = errors


class TransfersInProgress(RuntimeError):
    """The change would cut transfers in progress and the caller did not accept that."""

    def __init__(self, count: int, because: str) -> None:
        plural = "s" if count != 1 else ""
        super().__init__(
            f"{count} transfer{plural} in progress (downloads, uploads, viewers loading images) "
            f"would be cut off: {because}"
        )
        self.count = count
        self.because = because


@dataclass(frozen=True)
class NewCertificate:
    """A certificate and private key to install, already checked (``tls.check_pair``)."""

    certificate: bytes
    key: bytes
    facts: tls.CertificateFacts


@dataclass
class Applied:
    """What a change did: the settings changed (old, new) and what to tell whoever asked."""

    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Whether the archive took an ARCHIVE_API change at once (None: there was none).
    archive_told: bool | None = None


def change_settings(
    site: Site,
    texts: Mapping[str, str],
    *,
    username: str | None = None,
    certificate: NewCertificate | None = None,
    clear_certificate: bool = False,
    cut_transfers: bool = False,
) -> Applied:
    """Validate, store, record and apply the settings given as text (as typed in a form or a shell).

    Raises SettingsRefused (bad values, by name), TransfersInProgress (the change would cut
    transfers and ``cut_transfers`` is false) or ApplyError (the running web front refused the
    configuration); in each case nothing changed. ``username`` signs the activity event when no
    user is signed in (a shell). Called from a page, the web front is reloaded once the page's
    answer has gone out.
    """
    current = site.load_settings()
    new = _validated(site, current, texts, certificate)
    before = current.as_dict()
    changed = {name: (before[name], value) for name, value in new.items() if before[name] != value}
    if not changed and not certificate and not clear_certificate:
        return Applied()
    wanted = replace(current, **new)
    effects = {BY_NAME[name].effect for name in changed}
    # A new certificate under the same file names: Caddy must be made to read it, if it serves TLS.
    new_certificate_served = bool(certificate) and wanted.ssl_enabled
    if new_certificate_served:
        effects.add(Effect.WEB_FRONT)
    plan = _Plan.make(site, wanted, changed, effects, certificate_changed=new_certificate_served)
    if plan.cuts and not cut_transfers:
        count = transfers_in_progress(site)
        if count:
            raise TransfersInProgress(count, plan.cuts)

    folder = site.secrets_dir / "tls"
    previous = [_read(folder / "site.crt"), _read(folder / "site.key")]
    if certificate:
        tls.store_pair(folder, certificate.certificate, certificate.key)
    detail: dict[str, Any] = {name: {"old": old, "new": value} for name, (old, value) in changed.items()}
    if certificate:
        detail["certificate"] = certificate.facts.describe()
    if clear_certificate:
        detail["certificate"] = "cleared"
    from_page = _in_request()
    try:
        with site.engine.begin() as connection:
            db.put_settings(connection, {name: value for name, (_old, value) in changed.items()})
            record_activity(SettingsChangedEvent(changed=detail), connection=connection, username=username)
            # Inside the transaction: if the web front refuses it, nothing is stored either.
            if plan.caddyfile is not None:
                if from_page:
                    check_web_front(site, plan.caddyfile)
                else:
                    plan.web_front_loaded = load_web_front(site, plan.caddyfile, force=plan.force_load)
    except ApplyError:
        if certificate:
            _restore(folder, previous)
        raise
    if clear_certificate:
        for name in ("site.crt", "site.key"):
            (folder / name).unlink(missing_ok=True)
    applied = Applied(changed=changed)
    plan.apply(site, applied, from_page)
    return applied


def _validated(
    site: Site, current: SiteSettings, texts: Mapping[str, str], certificate: NewCertificate | None
) -> dict[str, Any]:
    """The typed values of ``texts``, or SettingsRefused with every problem found."""
    errors: dict[str, str] = {}
    new: dict[str, Any] = {}
    for name, text in texts.items():
        setting = BY_NAME.get(name)
        if setting is None:
            errors[name] = f"There is no setting {name!r}."
            continue
        try:
            new[name] = setting.parse(text)
        except ValueError as error:
            errors[name] = str(error)
    wanted = replace(current, **new)
    before = current.as_dict()
    fixed = configs.Topology.from_environment(site).ports_fixed
    for name, value in new.items():
        setting = BY_NAME[name]
        if not setting.listening_port or name in errors or value == before[name]:
            continue
        if fixed:
            errors[name] = "Fixed by this installation's compose.yaml: change the port mapping there."
        elif value and not network.port_is_free(value):
            errors[name] = f"Port {value} is used by another program."
    if wanted.ssl_enabled and not certificate and tls.stored_facts(site.secrets_dir / "tls") is None:
        errors.setdefault(
            "ssl_enabled",
            "SSL needs the site's certificate and private key first "
            "(on the setup page, or ./pacs config certificate CRT KEY).",
        )
    if errors:
        raise SettingsRefused(errors)
    return new


@dataclass
class _Plan:
    """What a change needs done to the running processes, worked out before anything is stored."""

    live: SiteSettings  # the values the generated files will hold: NEXT_START ones stay as running
    effects: set[Effect]
    running: bool  # the stack was prepared: files in run/ to keep current
    caddyfile: str | None = None  # the web front's new configuration, when its text changes
    force_load: bool = False  # a new certificate under the same file names: Caddy must read it again
    restart_archive: bool = False
    web_front_loaded: bool | None = None
    cuts: str = ""  # why transfers in progress would be cut, when they would

    @classmethod
    def make(
        cls,
        site: Site,
        wanted: SiteSettings,
        changed: dict[str, tuple[Any, Any]],
        effects: set[Effect],
        *,
        certificate_changed: bool,
    ) -> _Plan:
        running = configs.running_settings(site)
        if running is None:
            # Never started: the first start renders everything from the stored settings.
            return cls(live=wanted, effects=effects, running=False)
        kept = {}
        for name in BY_NAME:
            if BY_NAME[name].effect is Effect.NEXT_START and name in running:
                kept[name] = running[name]
        live = replace(wanted, **kept)
        plan = cls(live=live, effects=effects, running=True)
        reasons = []
        if Effect.WEB_FRONT in effects:
            topology = configs.Topology.from_environment(site)
            text = configs.render_caddy(site, live, topology)
            if text != _read_text(files.caddyfile(site)) or certificate_changed:
                plan.caddyfile = text
                plan.force_load = certificate_changed
                reasons.append("the web front must load a new configuration (web port, SSL), which ends them")
        if Effect.ARCHIVE_RESTART in effects:
            plan.restart_archive = True
            reasons.append(
                "the archive restarts to take the new DICOM settings, which ends what it sends and "
                "receives (modalities sending now must send again)"
            )
        plan.cuts = "; ".join(reasons)
        return plan

    def apply(self, site: Site, applied: Applied, from_page: bool) -> None:
        """Do what the stored change needs (see the module), and say so in ``applied.notes``."""
        changed = applied.changed
        if not self.running:
            applied.notes.append("Stored; it applies when the portal starts.")
            return
        topology = configs.Topology.from_environment(site)
        archive_effects = {Effect.ARCHIVE_API, Effect.ARCHIVE_RESTART} & self.effects
        if archive_effects:
            configs.write_orthanc_configurations(site, self.live, topology)
        configs.write_unavailable(site, self.live)
        configs.write_running_settings(site, self.live)
        # Each archive node is told itself: registrations and the default encoding live in each
        # Orthanc's memory.
        archive = nodes.connect(site, self.live, topology).each()
        if self.restart_archive:
            restarted = [name for name, orthanc in archive if restart_archive(orthanc)]
            if len(restarted) == len(archive):
                applied.notes.append("The archive restarts with the new DICOM settings.")
            elif restarted:
                applied.notes.append(
                    f"The archive restarts with the new DICOM settings ({', '.join(restarted)}); the "
                    "nodes that do not answer take them when they start."
                )
            else:
                applied.notes.append(
                    "The archive does not answer; it takes the new DICOM settings when it starts."
                )
        elif Effect.ARCHIVE_API in self.effects:
            told = []
            for name, orthanc in archive:
                try:
                    for setting, tell in TOLD_TO_THE_ARCHIVE.items():
                        if setting in changed:
                            tell(orthanc, self.live.as_dict()[setting])
                except (OrthancUnavailable, OrthancError) as error:
                    log.warning("Settings saved but not told to the archive now on %s: %s", name, error)
                else:
                    told.append(name)
            applied.archive_told = len(told) == len(archive)
            if applied.archive_told:
                applied.notes.append("The archive took it at once; nothing was restarted.")
            elif told:
                applied.notes.append(
                    f"The archive took it at once ({', '.join(told)}); the nodes that do not answer "
                    "take the change when they next start."
                )
            else:
                applied.notes.append(
                    "The archive does not answer right now; it takes the change when it next starts."
                )
        caddyfile = self.caddyfile
        if caddyfile is not None:
            if from_page:
                _after_response(lambda: _load_later(site, caddyfile, self.force_load, changed))
                applied.notes.append(APPLIED)
            elif self.web_front_loaded:
                applied.notes.append(APPLIED)
            else:
                applied.notes.append("The web front is not running; it takes it when it starts.")
        elif {Effect.NOTHING, Effect.WEB_FRONT} & self.effects:
            applied.notes.append(APPLIED)
        if Effect.NEXT_START in self.effects:
            applied.notes.append("The archive's internal port changes at the next start of the portal.")


def transfers_in_progress(site: Site) -> int:
    """How many requests Caddy is proxying right now (downloads, uploads, viewers' loads), less
    the page asking; 0 when no Caddy runs."""
    try:
        status, body = unixhttp.request(files.caddy_admin_socket(site), "GET", "/reverse_proxy/upstreams")
        upstreams = json.loads(body) if status == 200 else []
    except (OSError, ValueError):
        return 0
    count = sum(int(upstream.get("num_requests", 0)) for upstream in upstreams)
    return max(0, count - 1) if _in_request() else count


def check_web_front(site: Site, text: str) -> None:
    """Have the running Caddy check a configuration without applying it; ApplyError if it would
    refuse it. Does nothing when no Caddy runs."""
    _post_to_web_front(site, "/adapt", text)


def load_web_front(site: Site, text: str, *, force: bool = False) -> bool:
    """Load a configuration into the running Caddy and keep it as ``run/Caddyfile``.

    Returns whether a running Caddy took it (False: none runs; the file is what it starts with).
    Raises ApplyError when Caddy refuses it; the running configuration and the file then stay as
    they were. ``force`` makes Caddy load it even if its text is the same (a new certificate).
    """
    loaded = _post_to_web_front(site, "/load", text, force=force, timeout=30)
    write_private(files.caddyfile(site), text)
    return loaded


def _post_to_web_front(
    site: Site, endpoint: str, text: str, *, force: bool = False, timeout: float = 3
) -> bool:
    """Send a Caddyfile to an endpoint of the running Caddy's admin API; True when it took it,
    False when no Caddy runs (a socket left behind by one that is gone counts as none). Raises
    ApplyError when Caddy refuses it or does not answer."""
    headers = {"Content-Type": "text/caddyfile"}
    if force:
        headers["Cache-Control"] = "must-revalidate"
    try:
        status, body = unixhttp.request(
            files.caddy_admin_socket(site),
            "POST",
            endpoint,
            body=text.encode(),
            headers=headers,
            timeout=timeout,
        )
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except OSError as error:
        raise ApplyError(f"the web front did not answer: {error}") from None
    if status != 200:
        raise ApplyError(_caddy_reason(body))
    return True


def _load_later(site: Site, text: str, force: bool, changed: dict[str, tuple[Any, Any]]) -> None:
    """The page's deferred load. If Caddy refuses now what it accepted when asked (a port taken
    in between), the settings it needed go back as they were, and the activity log says so."""
    try:
        load_web_front(site, text, force=force)
    except ApplyError as error:
        log.error("The web front refused the new configuration: %s", error)
        back = {
            name: old for name, (old, _new) in changed.items() if BY_NAME[name].effect is Effect.WEB_FRONT
        }
        with site.engine.begin() as connection:
            db.put_settings(connection, back)
            record_activity(
                SettingsChangedEvent(
                    reason=f"the web front refused it: {error}",
                    changed={
                        name: {"old": new, "new": old} for name, (old, new) in changed.items() if name in back
                    },
                ),
                Outcome.FAILED,
                connection=connection,
                username="portal",
            )


def _caddy_reason(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", body.decode(errors="replace")))
    except ValueError:
        return body.decode(errors="replace")[:500]


def restart_archive(orthanc: Orthanc) -> bool:
    """Have Orthanc restart in place, reading its configuration file anew; True when it does.

    ``POST /tools/reset`` works whether Orthanc runs beside the portal or in a container of its own.
    """
    try:
        orthanc.request("POST", "/tools/reset", timeout=30)
    except (OrthancUnavailable, OrthancError):
        return False
    return True


def register_modalities(orthanc: Orthanc, modalities: list[Modality]) -> None:
    """Make Orthanc's registered modalities exactly these, at once (OrthancUnavailable when down).

    Orthanc keeps them in memory only (``DicomModalitiesInDatabase`` stays false): the setting stays
    the one list, and a restart cannot bring back a removed modality. What Orthanc is told about
    each is ``Modality.as_orthanc``, as in its configuration file.
    """
    wanted = {modality.aet: modality for modality in modalities}
    for name in orthanc.modalities():
        if name not in wanted:
            orthanc.delete_modality(name)
    for modality in modalities:
        orthanc.put_modality(modality.aet, modality.as_orthanc())


def set_default_encoding(orthanc: Orthanc, encoding: str) -> None:
    """Have Orthanc read files that name no character set in ``encoding`` (one of its names, such
    as ``Latin1``), at once. Orthanc 1.10.1 keeps it in memory (``PUT /tools/default-encoding``);
    its configuration file's ``DefaultEncoding`` holds the same for its next start."""
    orthanc.request("PUT", "/tools/default-encoding", encoding.encode(), content_type="text/plain")


# How each ARCHIVE_API setting is told to the running archive.
TOLD_TO_THE_ARCHIVE: dict[str, Callable[[Orthanc, Any], None]] = {
    "dicom_modalities": lambda orthanc, text: register_modalities(orthanc, parse_modalities(text)),
    "default_encoding": set_default_encoding,
}


def _in_request() -> bool:
    from flask import has_request_context

    return has_request_context()


def _after_response(job: Callable[[], None]) -> None:
    """Run ``job`` once the current response has gone out (in a thread of its own)."""
    from flask import after_this_request

    def run() -> None:
        time.sleep(0.2)  # let Caddy pass the answer on before it swaps configurations
        job()

    @after_this_request
    def when_sent(response):
        response.call_on_close(
            lambda: threading.Thread(target=run, name="apply-settings", daemon=True).start()
        )
        return response


def _read(path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _read_text(path) -> str | None:
    return path.read_text() if path.exists() else None


def _restore(folder: Path, previous: list[bytes | None]) -> None:
    """Put the certificate files back as they were before a refused change."""
    certificate, key = previous
    if certificate is None or key is None:
        for name in ("site.crt", "site.key"):
            (folder / name).unlink(missing_ok=True)
    else:
        tls.store_pair(folder, certificate, key)
