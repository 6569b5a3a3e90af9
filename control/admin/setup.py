"""The admin's HTTP server setup page: every site setting, validated, saved and applied live.

The form is built from the settings declaration (control.settings.SETTINGS): each setting shows
its label and help text and takes the input its type calls for, so a setting declared there
appears here by itself. Saving checks everything first (values, ports, the SSL certificate and
key); a bad value is refused next to its field and nothing changes. A good change is stored and
applied to the running portal (control.apply): if Caddy refuses it, the store is rolled back and
the old configuration keeps serving. Every change is an activity event with old and new values,
never with a key's contents.

A change that moves the page itself (SSL on or off, another web port) answers with a page that
waits until the old address stops answering as before, then takes the admin to the same page at
the new address, still signed in (control.cookies hands the session over). Web port 0 asks first:
nothing answers browsers after it, so the page says how to turn web access back on from a shell.
"""

from __future__ import annotations

from typing import Any

from flask import current_app, flash, g, make_response, redirect, render_template, request, url_for
from werkzeug.datastructures import FileStorage

from control import apply, configs, cookies, db, network, stack, tls
from control.activity import Action, record_activity
from control.admin import bp
from control.settings import SETTINGS, Setting
from control.site import REPOSITORY

# How the page groups the settings, as in the seed's dialog; anything not named here is listed
# under "Other settings", so a newly declared setting is never missing from the page.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "This web server",
        (
            "institution",
            "department",
            "public_address",
            "web_port",
            "ssl_enabled",
            "web_server_name",
            "hsts_include_subdomains",
        ),
    ),
    ("Web server usage", ("zip_content", "date_format", "time_zone")),
    (
        "Accessibility of studies via tokens",
        ("token_days", "token_identity_check", "contact_phone", "contact_email"),
    ),
    ("Sign-in", ("session_idle_minutes", "session_lifetime_hours")),
    ("Uploads", ("upload_max_mb", "upload_max_unpacked_mb", "disk_reserve_mb")),
    ("DICOM", ("dicom_aet", "dicom_port", "dicom_modalities", "dicom_store_from", "orthanc_http_port")),
)


def sections() -> list[tuple[str, list[Setting]]]:
    by_name = {setting.name: setting for setting in SETTINGS}
    grouped = [(title, [by_name[name] for name in names if name in by_name]) for title, names in SECTIONS]
    named = {name for _title, names in SECTIONS for name in names}
    rest = [setting for setting in SETTINGS if setting.name not in named]
    return grouped + ([("Other settings", rest)] if rest else [])


def field_kind(setting: Setting) -> str:
    """The form input a setting takes."""
    if setting.kind is bool:
        return "checkbox"
    if setting.choices:
        return "select"
    return "number" if setting.kind is int else "text"


def fixed_settings() -> frozenset[str]:
    """Settings this installation may not change from the page (ports fixed by compose.yaml)."""
    topology = configs.Topology.from_environment(current_app.extensions["site"])
    return frozenset(configs.PORT_SETTINGS if topology.ports_fixed else ())


def tls_folder():
    return current_app.extensions["site"].secrets_dir / "tls"


def _text_of(setting: Setting, form: dict[str, str]) -> str:
    if setting.kind is bool:
        return "yes" if form.get(setting.name) else "no"
    return form.get(setting.name, "")


def _uploaded(name: str) -> bytes | None:
    file: FileStorage | None = request.files.get(name)
    if not file or not file.filename:
        return None
    return file.stream.read(tls.MAX_PEM_BYTES + 1)


@bp.route("/settings", methods=["GET", "POST"])
def settings():
    current = g.settings
    errors: dict[str, str] = {}
    typed: dict[str, Any] = dict(current)
    confirm_web_off = False
    if request.method == "POST":
        if request.form.get("clear_ssl"):
            return _clear_ssl(current)
        fixed = fixed_settings()
        for setting in SETTINGS:
            if setting.name in fixed or (setting.name not in request.form and setting.kind is not bool):
                continue  # a field the page did not show, or showed fixed, keeps its value
            try:
                typed[setting.name] = setting.parse(_text_of(setting, request.form))
            except ValueError as error:
                errors[setting.name] = str(error)
                typed[setting.name] = request.form.get(setting.name, "")
        certificate, key = _uploaded("certificate"), _uploaded("key")
        new_pair = None
        if certificate or key:
            try:
                if not (certificate and key):
                    raise tls.CertificateError("Select both the certificate file and the private key file.")
                new_pair = (certificate, key, tls.check_pair(certificate, key))
            except tls.CertificateError as error:
                errors["certificate" if error.field == "certificate" else "key"] = str(error)
        if typed.get("ssl_enabled") and not new_pair and tls.stored_facts(tls_folder()) is None:
            errors["ssl_enabled"] = "SSL needs a certificate file and a private key file."
        for name in ("web_port", "dicom_port"):
            port = typed.get(name)
            # A port is fine when it is free, or when it is the one this portal already listens on.
            if name not in errors and port and port != current[name] and not stack.port_is_free(port):
                errors[name] = f"Port {port} is used by another program."
        turns_web_off = not typed.get("web_port") and current["web_port"]
        confirm_web_off = bool(turns_web_off and request.form.get("confirm_web_off") != "yes")
        if not errors and not confirm_web_off:
            try:
                _save(current, typed, new_pair)
            except apply.ApplyError as error:
                errors["form"] = (
                    f"The web server refused the new configuration, which was not applied: {error}"
                )
            else:
                return _after_save(current, typed)
    return render_template(
        "admin/settings.html",
        sections=sections(),
        field_kind=field_kind,
        fixed=fixed_settings(),
        values=typed,
        errors=errors,
        certificate=tls.stored_facts(tls_folder()),
        local_address=network.local_address(),
        connected_host=request.host.rsplit(":", 1)[0],
        origin=network.public_origin(current),
        saved=request.args.get("saved") and request.method == "GET",
        archive_settings=apply.ARCHIVE_SETTINGS,
        next_start_settings=apply.NEXT_START_SETTINGS,
        confirm_web_off=confirm_web_off,
        web_on_command=web_on_command(current["web_port"] or 3000),
    ), (400 if errors else 200)


def web_on_command(port: int) -> str:
    """The shell command that turns web access back on, for this installation."""
    site = current_app.extensions["site"]
    data = "" if site.data == (REPOSITORY / "data").resolve() else f" --data {site.data}"
    return f"./pacs{data} config set web_port {port}"


def _split_host(host: str) -> tuple[str, str]:
    """``host[:port]`` as the browser sent it, in its two parts (the port may be empty)."""
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit() or host.endswith("]"):
        return host, ""
    return name, port


def _after_save(current: dict[str, Any], typed: dict[str, Any]):
    """The answer to a saved change: this page again, at the address the portal now answers."""
    if not typed["web_port"]:
        return render_template("admin/web_off.html", web_on_command=web_on_command(current["web_port"]))
    page = url_for("admin.settings", saved=1)
    host, port = _split_host(request.host)
    scheme = "https" if typed["ssl_enabled"] else "http"
    if typed["web_port"] != current["web_port"]:
        port = str(typed["web_port"])
    target = f"{scheme}://{host}{':' + port if port else ''}"
    if target == f"{request.scheme}://{request.host}":
        return redirect(page)
    response = make_response(
        render_template("admin/moving.html", target=target + page, origin=target, to_https=scheme == "https")
    )
    if request.is_secure and scheme == "http":
        # The admin's browser must come back over plain http: it forgets this name's HSTS, and
        # its session goes along under the plain cookie (a __Host- one is never sent over http).
        response.headers["Strict-Transport-Security"] = "max-age=0"
        cookies.carry_session_to_http()
    response.headers["Cache-Control"] = "no-store"
    return response


def _save(current: dict[str, Any], typed: dict[str, Any], new_pair) -> None:
    """Store, apply, and log a change; on refusal put everything back as it was."""
    site = current_app.extensions["site"]
    changed = {name: value for name, value in typed.items() if current.get(name) != value}
    folder = tls_folder()
    previous = [
        path.read_bytes() if path.exists() else None for path in (folder / "site.crt", folder / "site.key")
    ]
    if new_pair:
        tls.store_pair(folder, new_pair[0], new_pair[1])
    try:
        with site.engine.begin() as connection:
            db.put_settings(connection, changed)
            detail: dict[str, Any] = {
                name: {"old": current.get(name), "new": value} for name, value in changed.items()
            }
            if new_pair:
                detail["certificate"] = new_pair[2].describe()
            if detail:
                record_activity(Action.SETTINGS_CHANGED, connection=connection, changed=detail)
            # Inside the transaction: if Caddy would refuse it, the settings are not stored either.
            apply.check_web_settings(site, typed)
        apply.apply_later(current_app._get_current_object(), site, typed)
    except apply.ApplyError:
        if new_pair:
            if None in previous:
                for name in ("site.crt", "site.key"):
                    (folder / name).unlink(missing_ok=True)
            else:
                tls.store_pair(folder, previous[0], previous[1])
        raise
    if changed.keys() & apply.ARCHIVE_SETTINGS:
        restarted = apply.restart_archive(site, typed)
        flash(
            "The archive is restarting with the new DICOM settings."
            if restarted
            else "The new DICOM settings apply when the archive next starts.",
            "info",
        )
    if changed.keys() & apply.NEXT_START_SETTINGS:
        flash("The archive's internal port changes at the next start of the portal.", "info")
    if typed["web_port"]:
        flash(f"Saved. The portal is reachable at {network.public_origin(typed)}/", "info")


def _clear_ssl(current: dict[str, Any]):
    """The dialog's "Clear values": forget the certificate and key, and turn SSL off."""
    site = current_app.extensions["site"]
    typed = {**current, "ssl_enabled": False}
    with site.engine.begin() as connection:
        db.put_settings(connection, {"ssl_enabled": False})
        record_activity(
            Action.SETTINGS_CHANGED,
            connection=connection,
            changed={
                "ssl_enabled": {"old": current.get("ssl_enabled"), "new": False},
                "certificate": "cleared",
            },
        )
    # The certificate files go once Caddy no longer uses them, after the answer (see apply_later).
    apply.apply_later(current_app._get_current_object(), site, typed)
    for name in ("site.crt", "site.key"):
        (tls_folder() / name).unlink(missing_ok=True)
    flash("The certificate and key are cleared; SSL is off.", "info")
    return _after_save(current, typed)
