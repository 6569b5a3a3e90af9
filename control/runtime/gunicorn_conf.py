"""gunicorn's hooks for the control plane (``--config python:control.runtime.gunicorn_conf``).

- The workers' metrics live in ``run/metrics/`` (``prometheus_client``'s multiprocess mode, see
  ``control.metrics``): the folder is named before any worker starts, emptied when the master
  starts (counters begin again with the portal, as Prometheus expects of a restart), and a worker
  that exits is marked dead so that its gauges stop counting.
- Each worker, once it has built the app, starts the app's archive watcher (``control.watch``:
  one of them at a time does the work).
- Each worker runs the activity log's daily retention thread and the archive's daily sweep of
  orphan files (only one of them, through a lease in the database, does each on a given day).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from control import services
from control.site import Site

# Read by the master before anything else of the control plane is imported (its logger class
# imports the metrics): the folder must be there, and empty, by then.
# Each control plane of a multi-node portal on one machine has its folder (``PACS_CONTROL_PLANE``,
# set by the runner): a plane starting must not empty the counters of another.
_plane = os.environ.get("PACS_CONTROL_PLANE", "1")
_metrics = Site().run / ("metrics" if _plane == "1" else f"metrics-{_plane}")
shutil.rmtree(_metrics, ignore_errors=True)
_metrics.mkdir(mode=0o700, parents=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics)


def post_worker_init(worker: Any) -> None:
    from control.activity import start_retention
    from control.orphans import start_daily_sweep

    services.archive_watch(worker.wsgi).start()
    start_retention(worker.wsgi)
    start_daily_sweep(services.site(worker.wsgi))


def child_exit(_server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
