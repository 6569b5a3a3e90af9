"""gunicorn's logger for the control plane (``--logger-class control.runtime.serving.AccessLogger``).

The access log: a viewer opening a series asks for every frame (which the control plane answers)
and Caddy asks the DICOMweb gate about its other requests: a hundred lines of "yes" for every
series a user looks at, written while the frames wait. Those lines tell nothing the activity log
does not (it records who opened which study, and every refusal), so they are left out; every other
request, and every frame or gate answer other than a plain success, is logged as usual.

gunicorn gives its log files to its own user and primary group whenever it opens them; with
``PACS_DATA_GROUP`` they go back to the data directory's group (see ``control.site``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from gunicorn.glogging import Logger

from control.dicomweb.fast import GATE_PATH
from control.dicomweb.frames import FrameRequest
from control.site import data_group

if TYPE_CHECKING:
    from gunicorn.http import Request
    from gunicorn.http.wsgi import Response


class AccessLogger(Logger):
    """gunicorn's logger, without the routine lines of the viewer and the gate."""

    def _set_handler(self, log: logging.Logger, output: Any, fmt: Any, stream: Any = None) -> None:
        super()._set_handler(log, output, fmt, stream)  # type: ignore[misc]  # private: not in the stubs
        group = data_group()
        if group is not None and isinstance(output, str) and output != "-":
            os.chown(output, -1, group)

    def access(
        self, resp: Response, req: Request, environ: MutableMapping[str, Any], request_time: dt.timedelta
    ) -> None:
        path = environ.get("PATH_INFO", "")
        if resp.status_code == 200 and (path == GATE_PATH or FrameRequest.of(path)):
            return
        super().access(resp, req, environ, request_time)
