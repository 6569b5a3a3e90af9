"""gunicorn's access log for the control plane.

A viewer opening a series makes Caddy ask the DICOMweb gate once per frame: a hundred lines of
"yes" for every series a user looks at, written while the frames wait. Those lines tell nothing the
activity log does not (it records who opened which study, and every refusal), so they are left
out; every other request, and every gate answer other than "yes", is logged as usual.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from control.dicomweb.fast import GATE_PATH


class AccessLogger(Logger):
    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if environ.get("PATH_INFO") == GATE_PATH and resp.status_code == 200:
            return
        super().access(resp, req, environ, request_time)
