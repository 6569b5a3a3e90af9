"""The modality worklist, for admins: the entries HL7 orders made, and the modalities that may
query it.

Orders come in with the uploads (``control.uploads``, for users who may upload); what stands in
the worklist and who may query it is the admin's, so these pages are the admin blueprint's. They
keep the addresses under ``/upload/worklist`` they were published at: the admin blueprint's
``/admin`` prefix is not put in front of them.
"""

from __future__ import annotations

from typing import Any

from flask import flash, redirect, render_template, request, url_for

from control import formatting, services
from control.activity import record_activity
from control.admin import bp
from control.events import WorklistDeletedEvent
from control.orthanc import OrthancError, OrthancUnavailable
from control.runtime import apply
from control.settings import Modality, parse_modalities, registrable
from control.uploads import worklist

ADDRESS_PREFIX = "/upload"


def _kept_address(rule: str, **options: Any):
    """Register the decorated view as ``admin.<name>`` at ``ADDRESS_PREFIX + rule``."""

    def register(view):
        bp.record_once(
            lambda state: state.app.add_url_rule(
                ADDRESS_PREFIX + rule, f"{bp.name}.{view.__name__}", view, **options
            )
        )
        return view

    return register


@_kept_address("/worklist")
def worklist_page():
    """The admin's view of the modality worklist and of the modalities that may query it."""
    return render_template(
        "admin/worklist.html",
        entries=worklist.list_entries(services.site().worklists),
        modalities=parse_modalities(services.settings().dicom_modalities),
        registered=_registered_now(),
    )


def _registered_now() -> set[str] | None:
    """The AE titles Orthanc knows right now, or None when it does not answer."""
    try:
        registered = services.archive().modalities()
    except (OrthancUnavailable, OrthancError):
        return None
    return {entry.get("AET", name) for name, entry in registered.items()}


@_kept_address("/worklist/<entry_id>/delete", methods=["POST"])
def worklist_delete(entry_id: str):
    """Delete one worklist entry (a modality no longer finds it)."""
    deleted = worklist.delete_entry(services.site().worklists, entry_id)
    if deleted is None:
        flash("That worklist entry is no longer there.", "error")
    else:
        record_activity(
            WorklistDeletedEvent(accession=deleted.accession_number, modality=deleted.modality),
            patient=formatting.patient_label(deleted.patient_name, deleted.patient_id),
            patient_id=deleted.patient_id,
        )
        flash(f"Deleted the worklist entry of accession number {deleted.accession_number}.", "info")
    return redirect(url_for("admin.worklist_page"), 303)


@_kept_address("/worklist/modalities", methods=["POST"])
def worklist_modalities():
    """Add (``aet``, ``host``, ``port``) or remove (``remove``: an AE title) a registered modality."""
    current = parse_modalities(services.settings().dicom_modalities)
    removing = request.form.get("remove", "").strip()
    if removing:
        return _save_modalities([modality for modality in current if modality.aet != removing])
    aet, host, port = (request.form.get(name, "").strip() for name in ("aet", "host", "port"))
    try:
        parsed = registrable(f"{aet}@{host}:{port}") if aet and host and port else []
        if len(parsed) != 1:
            raise ValueError("give one AE title, its host and its port")
    except ValueError as error:
        flash(f"Not registered: {error}.", "error")
        return redirect(url_for("admin.worklist_page"), 303)
    added = parsed[0]
    wanted = [*(modality for modality in current if modality.aet.upper() != added.aet.upper()), added]
    return _save_modalities(wanted)


def _save_modalities(wanted: list[Modality]) -> Any:
    """Change ``dicom_modalities`` as any setting changes (``control.runtime.apply``): the archive is told
    through its REST API at once, nothing is restarted."""
    try:
        applied = apply.change_settings(services.site(), {"dicom_modalities": " ".join(map(str, wanted))})
    except apply.SettingsRefused as error:
        flash(f"Not registered: {error}", "error")
    else:
        if applied.archive_told is False:
            flash(
                "Saved. The archive does not answer right now; it takes the list when it next starts.",
                "error",
            )
        else:
            flash("Saved: the registered modalities may now query the worklist.", "info")
    return redirect(url_for("admin.worklist_page"), 303)
