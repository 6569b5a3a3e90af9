"""The admin's HTTP server setup page: every site setting, validated, saved and applied live.

The form is built from the settings declaration (control.settings.SETTINGS): each setting shows
its label, its help text and what saving it does, and takes the input its type calls for, so a
setting declared there appears here by itself. Saving goes through ``apply.change_settings``, as
every change does: everything is checked first (values, ports, the SSL certificate and key); a bad
value is refused next to its field and nothing changes. A change that would cut transfers in
progress (a new web port or SSL, new DICOM settings) shows how many first, and is made only when
the admin confirms. If Caddy refuses the new configuration, nothing is stored and the old one
keeps serving. Every change is an activity event with old and new values, never a key's contents.

A change that moves the page itself (SSL on or off, another web port) answers with a page that
waits until the old address stops answering as before, then takes the admin to the same page at
the new address, still signed in (control.cookies hands the session over). Web port 0 asks first:
nothing answers browsers after it, so the page says how to turn web access back on from a shell.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from flask import flash, make_response, redirect, render_template, request, url_for
from werkzeug.datastructures import FileStorage

from control import cookies, network, services, tls
from control.admin import bp
from control.runtime import apply, configs
from control.settings import SETTINGS, Effect, Setting, SiteSettings
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
    (
        "DICOM",
        (
            "dicom_aet",
            "dicom_port",
            "dicom_modalities",
            "dicom_store_from",
            "default_encoding",
            "orthanc_http_port",
        ),
    ),
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


BY_KIND = {setting.name: setting.kind for setting in SETTINGS}

# What saving a setting does, as its help text on the page says it (``Setting.effect``).
EFFECT_NOTES = {
    Effect.NOTHING: "",
    Effect.WEB_FRONT: "Saving a change reloads the web front, which cuts the transfers in progress: "
    "you are told how many first.",
    Effect.ARCHIVE_API: "Applied to the archive at once, without a restart.",
    Effect.ARCHIVE_RESTART: "Saving a change restarts the archive, which cuts the transfers in "
    "progress: you are told how many first.",
    Effect.NEXT_START: "Applies at the next start of the portal.",
}


def fixed_settings() -> frozenset[str]:
    """Settings this installation may not change from the page (ports fixed by compose.yaml)."""
    topology = configs.Topology.from_environment(services.site())
    return frozenset(configs.PORT_SETTINGS if topology.ports_fixed else ())


def tls_folder():
    return services.site().secrets_dir / "tls"


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
    current = services.settings()
    errors: dict[str, str] = {}
    typed: dict[str, Any] = current.as_dict()
    confirm_web_off = False
    cuts: apply.TransfersInProgress | None = None
    clearing = bool(request.form.get("clear_ssl"))
    if request.method == "POST":
        texts = {"ssl_enabled": "no"} if clearing else _texts(request.form)
        # Shown again as typed if anything is refused.
        typed.update({name: text == "yes" if BY_KIND[name] is bool else text for name, text in texts.items()})
        certificate, key = _uploaded("certificate"), _uploaded("key")
        new_pair = None
        if certificate or key:
            try:
                if not (certificate and key):
                    raise tls.CertificateError("Select both the certificate file and the private key file.")
                new_pair = apply.NewCertificate(certificate, key, tls.check_pair(certificate, key))
            except tls.CertificateError as error:
                errors["certificate" if error.field == "certificate" else "key"] = str(error)
        turns_web_off = texts.get("web_port", "").strip() == "0" and current.web_port
        confirm_web_off = bool(turns_web_off and request.form.get("confirm_web_off") != "yes")
        if not errors and not confirm_web_off:
            try:
                applied = apply.change_settings(
                    services.site(),
                    texts,
                    certificate=new_pair,
                    clear_certificate=clearing,
                    cut_transfers=request.form.get("cut_transfers") == "yes",
                )
            except apply.SettingsRefused as error:
                errors.update(error.errors)
            except apply.TransfersInProgress as error:
                cuts = error
            except apply.ApplyError as error:
                errors["form"] = (
                    f"The web server refused the new configuration, which was not applied: {error}"
                )
            else:
                return _saved(current, applied, clearing)
    return render_template(
        "admin/settings.html",
        sections=sections(),
        field_kind=field_kind,
        fixed=fixed_settings(),
        values=typed,
        errors=errors,
        cuts=cuts,
        clearing=clearing,
        # Files cannot be sent back to the browser: a confirmation needs them chosen again.
        reselect_files=bool(cuts and request.files.get("certificate")),
        certificate=tls.stored_facts(tls_folder()),
        local_address=network.local_address(),
        connected_host=request.host.rsplit(":", 1)[0],
        origin=network.public_origin(current),
        saved=request.args.get("saved") and request.method == "GET",
        effect_notes={setting.name: EFFECT_NOTES[setting.effect] for setting in SETTINGS},
        confirm_web_off=confirm_web_off,
        web_on_command=web_on_command(current.web_port or 3000),
    ), (400 if errors else 409 if cuts else 200)


def _texts(form) -> dict[str, str]:
    """The settings as the form gives them: those it showed, and not fixed by the installation."""
    fixed = fixed_settings()
    return {
        setting.name: _text_of(setting, form)
        for setting in SETTINGS
        if setting.name not in fixed and (setting.name in form or setting.kind is bool)
    }


def _saved(current: SiteSettings, applied: apply.Applied, cleared: bool):
    """After a change: say what it did, and show the page again, from where the portal now is."""
    values = replace(current, **_new(applied))
    if cleared:
        flash("The certificate and key are cleared; SSL is off.", "info")
    else:
        for note in applied.notes:
            if note != apply.APPLIED:
                flash(note, "info")
        if values.web_port:
            flash(f"Saved. The portal is reachable at {network.public_origin(values)}/", "info")
    return _after_save(current, values)


def _new(applied: apply.Applied) -> dict[str, Any]:
    return {name: new for name, (_old, new) in applied.changed.items()}


def web_on_command(port: int) -> str:
    """The shell command that turns web access back on, for this installation."""
    site = services.site()
    data = "" if site.data == (REPOSITORY / "data").resolve() else f" --data {site.data}"
    return f"./pacs{data} config set web_port {port}"


def _split_host(host: str) -> tuple[str, str]:
    """``host[:port]`` as the browser sent it, in its two parts (the port may be empty)."""
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit() or host.endswith("]"):
        return host, ""
    return name, port


def _after_save(current: SiteSettings, typed: SiteSettings):
    """The answer to a saved change: this page again, at the address the portal now answers."""
    if not typed.web_port:
        return render_template("admin/web_off.html", web_on_command=web_on_command(current.web_port))
    page = url_for("admin.settings", saved=1)
    host, port = _split_host(request.host)
    scheme = "https" if typed.ssl_enabled else "http"
    if typed.web_port != current.web_port:
        port = str(typed.web_port)
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
