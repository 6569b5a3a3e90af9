"""The portal's processes, apart from the web app they serve.

- ``stack``: the native runner: set-up, then Orthanc, the control plane, the catalog's feeder
  and Caddy, started in order, watched and restarted (``./pacs up``).
- ``configs``: the configuration files of Orthanc and Caddy, rendered from the settings.
- ``apply``: a changed setting validated, stored, recorded and applied to the running processes.
- ``service``: the same processes as systemd units (``./pacs service install``).
- ``gunicorn_conf``, ``serving``: the control plane's gunicorn hooks and access log.
- ``logs``: where every process's output goes, and how it is kept from filling the disk.
- ``unixhttp``: HTTP over the unix sockets of the control plane and of Caddy's admin API.
- ``files``: the names of the sockets, pid files and markers in the data directory's ``run/``.

The web app imports ``configs`` and ``apply`` (a setting changed on a page is applied at once),
never the runner.
"""
