"""gunicorn's settings for the control plane: its access log, and the archive watcher.

gunicorn reads this module as its configuration (``--config python:control.serving``): each worker,
once it has built the app, starts the app's archive watcher (``control.watch``).

The access log: a viewer opening a series asks for every frame (which the control plane answers)
and Caddy asks the DICOMweb gate about its other requests: a hundred lines of "yes" for every
series a user looks at, written while the frames wait. Those lines tell nothing the activity log
does not (it records who opened which study, and every refusal), so they are left out; every other
request, and every frame or gate answer other than a plain success, is logged as usual.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from control.dicomweb.fast import GATE_PATH
from control.dicomweb.frames import FRAME_REQUEST


def post_worker_init(worker: Any) -> None:
    worker.wsgi.extensions["archive_watch"].start()


class AccessLogger(Logger):
    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        path = environ.get("PATH_INFO", "")
        if resp.status_code == 200 and (path == GATE_PATH or FRAME_REQUEST.fullmatch(path)):
            return
        super().access(resp, req, environ, request_time)
