"""Registering the modalities that may query the worklist (and the archive) over DICOM.

Orthanc refuses worklist queries from modalities it does not know (``DicomAlwaysAllowFindWorklist``
is false). The list lives in one place, the ``dicom_modalities`` setting, and reaches Orthanc two
ways: rendered into its configuration file (``DicomModalities``), which Orthanc reads when it
starts, and registered at once through its REST API (``PUT /modalities/{aet}``), which Orthanc keeps
in memory only (``DicomModalitiesInDatabase`` stays false, so the setting remains the one truth and
a restart of Orthanc cannot bring back a removed modality).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from control import configs, db
from control.orthanc import Orthanc
from control.settings import Modality
from control.site import Site


def save(site: Site, modalities: Sequence[Modality]) -> dict[str, Any]:
    """Store the list and render Orthanc's configuration with it; return the new settings."""
    text = " ".join(str(modality) for modality in modalities)
    with site.engine.begin() as connection:
        db.put_settings(connection, {"dicom_modalities": text})
    values = site.load_settings()
    if site.run.is_dir():
        topology = configs.Topology.from_environment(site)
        configs.write_private(site.run / "orthanc.json", configs.render_orthanc(site, values, topology))
    return values


def register(orthanc: Orthanc, modalities: Sequence[Modality]) -> None:
    """Make Orthanc's modalities the given ones now (raises OrthancUnavailable when it is down)."""
    wanted = {modality.aet: modality for modality in modalities}
    for name in orthanc.modalities():
        if name not in wanted:
            orthanc.delete_modality(name)
    for modality in modalities:
        orthanc.put_modality(modality.aet, modality.aet, modality.host, modality.port)
