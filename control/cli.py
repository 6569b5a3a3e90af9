"""``./pacs``: run, stop, inspect and test the portal from a shell.

The bash script ``pacs`` installs what is missing and then hands over to this module, so every
command here can assume the Debian packages and the virtual environment are in place.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from control import accounts, db
from control import settings as site_settings
from control.activity import record_activity
from control.events import (
    Event,
    SettingsChangedEvent,
    TokenCopiedEvent,
    TokenMadeEvent,
    UserChangedEvent,
    UserCreatedEvent,
)
from control.network import local_address
from control.runtime import configs, files, logs, stack, unixhttp
from control.site import REPOSITORY, Site, SiteError

if TYPE_CHECKING:
    from control.nodes import Archive


def _fail(message: str) -> NoReturn:
    click.echo(f"pacs: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    "data",
    type=click.Path(file_okay=False, path_type=Path),
    help="The data directory (default: PACS_DATA, else ./data).",
)
@click.pass_context
def main(context: click.Context, data: Path | None) -> None:
    """The PACS web portal: Orthanc, the control plane and Caddy on one machine."""
    context.obj = Site(data)
    os.environ["PACS_DATA"] = str(context.obj.data)
    # Whatever a command writes into the data directory (the database first) is private from creation.
    try:
        os.umask(context.obj.umask)
    except SiteError as error:
        _fail(str(error))


def banner(site: Site, prepared: stack.Prepared) -> str:
    values = prepared.settings
    lines = [f"The PACS web portal of {values.institution} is running."]
    if values.web_port:
        port = values.web_port
        if values.ssl_enabled:
            host = values.web_server_name or local_address()
            lines.append(f"  Web:    https://{host}:{port}/  (https only; http:// is sent on to it)")
        else:
            lines.append(
                f"  Web:    http://{local_address()}:{port}/  (on this machine: http://127.0.0.1:{port}/)"
            )
    else:
        lines.append("  Web:    off (web port 0)")
    topology = prepared.topology
    archive = configs.archive_nodes(values, topology)
    if len(archive) > 1:
        ports = ", ".join(str(node.dicom_port) for node in archive)
        lines.append(f"  DICOM:  AE title {values.dicom_aet}, port {values.dicom_port} (every node: {ports})")
        lines.append(
            f"  Nodes:  {len(archive)} archive nodes on one PostgreSQL index, "
            f"{len(topology.control_upstreams)} control planes; the first node takes the writes"
        )
    else:
        lines.append(f"  DICOM:  AE title {values.dicom_aet}, port {values.dicom_port}")
        if topology.archive_index == "postgresql":
            lines.append("  Index:  the archive's index is on PostgreSQL")
    if prepared.admin_password:
        lines.append(
            f"  Admin:  user {stack.ADMIN_USERNAME!r}, password {prepared.admin_password}  "
            "(shown this once: note it now)"
        )
    lines.append(f"  Data:   {site.data}")
    lines.append(f"  Logs:   {logs.describe(site.logs)}")
    return "\n".join(lines)


@main.command()
@click.option("--detach", is_flag=True, help="Run in the background; stop with ./pacs down.")
@click.option(
    "--nodes",
    type=click.IntRange(1, 16),
    help="Run this many archive nodes and control planes on one PostgreSQL (kept for later starts).",
)
@click.option("--quiet", is_flag=True, hidden=True)
@click.pass_obj
def up(site: Site, detach: bool, nodes: int | None, quiet: bool) -> None:
    """Set up what is missing and run the portal (Ctrl-C stops it)."""
    if nodes:
        # Read by prepare (and by the background runner of --detach), recorded in run/topology.json.
        os.environ["PACS_NODES"] = str(nodes)
    if quiet:
        # The runner started by --detach: its own messages go to a rotating pacs.log too.
        logs.capture_own_output(site.logs / "pacs.log")
    try:
        prepared = stack.prepare(site)
        if detach:
            running = stack.running_supervisor(site)
            if running:
                _fail(f"the portal of {site.data} already runs (pid {running}); ./pacs down stops it")
            stack.check_ports(prepared.settings, prepared.topology)
            pid = stack.start_detached(site)
            click.echo(banner(site, prepared))
            click.echo(f"  Runs in the background (pid {pid}); ./pacs down stops it.")
            return
        supervisor = stack.Supervisor(site, prepared)

        def ready() -> None:
            if not quiet:
                click.echo(banner(site, prepared))
                click.echo("  Press Ctrl-C to stop.")
            sys.stdout.flush()

        code = supervisor.run(on_ready=ready)
        if not quiet:
            click.echo("pacs: stopped.")
        sys.exit(code)
    except stack.StackError as error:
        _fail(str(error))
    except db.MigrationError as error:
        _fail(str(error))


@main.command()
@click.pass_obj
def down(site: Site) -> None:
    """Stop a portal started with ``up --detach``."""
    if stack.stop_detached(site):
        click.echo("pacs: stopped.")
    else:
        click.echo("pacs: the portal was not running.")


@main.command()
@click.pass_obj
def status(site: Site) -> None:
    """Say what runs; exit 0 when the portal runs, 3 when it does not."""
    supervisor = stack.running_supervisor(site)
    parts = dict(stack.leftover_processes(site))
    click.echo(f"portal ({site.data}): " + (f"running, pid {supervisor}" if supervisor else "not running"))
    roles = ("orthanc", "control", "catalog", "caddy")

    # Every archive node and control plane that runs (orthanc-2...), each after the first of its role.
    def order(name: str) -> tuple[int, str]:
        role = name.split("-")[0]
        return (roles.index(role) if role in roles else len(roles), name)

    names = sorted({*roles, *parts}, key=order)
    for name in names:
        click.echo(f"  {name:8} " + (f"running, pid {parts[name]}" if name in parts else "not running"))
    click.echo(f"  {logs.describe(site.logs)}")
    from control.runtime import service

    if service.installed():
        click.echo("  installed as systemd services: systemctl status 'pacs-*'")
    if parts.get("control"):
        try:
            code, body = unixhttp.request(files.control_socket(site), "GET", "/healthz")
            click.echo(f"  health   {json.loads(body).get('status', code)}")
        except OSError as error:
            click.echo(f"  health   unknown ({error})")
    sys.exit(0 if supervisor else 3)


@main.command()
@click.pass_obj
def prepare(site: Site) -> None:
    """Set up the data directory and generated configs, then exit."""
    try:
        stack.prepare(site)
    except stack.StackError as error:
        _fail(str(error))


@main.command()
@click.pass_obj
def serve(site: Site) -> None:
    """Set up, then run the control plane alone in the foreground (the control container's command)."""
    try:
        prepared = stack.prepare(site)
    except stack.StackError as error:
        _fail(str(error))
    argv = stack.gunicorn_argv(site, prepared.topology)
    os.environ["TMPDIR"] = str(site.spool)  # see Site.spool
    sys.stdout.flush()
    os.execv(argv[0], argv)  # noqa: S606 - the container's main process becomes gunicorn


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def test(pytest_args: tuple[str, ...]) -> None:
    """Run the whole test suite (pytest); extra arguments go to pytest."""
    code = subprocess.call([sys.executable, "-m", "pytest", *pytest_args], cwd=REPOSITORY)
    sys.exit(code)


@main.group()
def config() -> None:
    """Show or change site settings."""


@config.command("show")
@click.pass_obj
def config_show(site: Site) -> None:
    """Print every setting with its value."""
    db.migrate(site.engine)
    values = site.load_settings()
    for setting in site_settings.SETTINGS:
        click.echo(f"{setting.name} = {json.dumps(values.as_dict()[setting.name], ensure_ascii=False)}")


@config.command("docs")
def config_docs() -> None:
    """Print the settings table of the documentation (README.md holds the same)."""
    click.echo(site_settings.markdown_table(), nl=False)


@config.command("set")
@click.argument("name")
@click.argument("value")
@click.option(
    "--cut-transfers",
    is_flag=True,
    help="Apply it even if that cuts the transfers in progress (a new web port or SSL, new DICOM settings).",
)
@click.pass_obj
def config_set(site: Site, name: str, value: str, cut_transfers: bool) -> None:
    """Change one setting and apply it to the running portal, as the setup page does."""
    if name not in site_settings.BY_NAME:
        _fail(f"no setting {name!r}; ./pacs config show lists them")
    db.migrate(site.engine)
    applied = _change(site, {name: value}, cut_transfers=cut_transfers)
    click.echo(f"{name} = {json.dumps(site.load_settings().as_dict()[name], ensure_ascii=False)}")
    for note in applied.notes:
        click.echo(note)


@config.command("certificate")
@click.argument("certificate", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--cut-transfers", is_flag=True, help="Apply it even if that cuts the transfers in progress.")
@click.pass_obj
def config_certificate(site: Site, certificate: Path, key: Path, cut_transfers: bool) -> None:
    """Check and install the site's certificate (.crt) and private key (.key) for SSL."""
    from control import tls
    from control.runtime import apply

    certificate_pem, key_pem = certificate.read_bytes(), key.read_bytes()
    try:
        facts = tls.check_pair(certificate_pem, key_pem)
    except tls.CertificateError as error:
        _fail(str(error))
    db.migrate(site.engine)
    applied = _change(
        site,
        {},
        certificate=apply.NewCertificate(certificate_pem, key_pem, facts),
        cut_transfers=cut_transfers,
    )
    click.echo(f"certificate installed: {facts.describe()}")
    for note in applied.notes:
        click.echo(note)
    if not site.load_settings().ssl_enabled:
        click.echo("turn SSL on with: ./pacs config set ssl_enabled yes")


def _change(site: Site, texts: dict[str, str], **options):
    """``apply.change_settings`` from a shell: its refusals become messages and exit code 1."""
    from control.runtime import apply

    try:
        return apply.change_settings(site, texts, username=_shell_user(), **options)
    except apply.SettingsRefused as error:
        _fail(str(error))
    except apply.TransfersInProgress as error:
        _fail(f"{error}. Nothing changed: try again later, or add --cut-transfers to apply it now.")
    except apply.ApplyError as error:
        _fail(f"the running portal refused it, nothing changed: {error}")


@main.group()
def user() -> None:
    """Manage web users from a shell (for scripts and recovery)."""


def _read_new_password() -> str:
    """A new password: asked twice on a terminal, else the first line of standard input."""
    if sys.stdin.isatty():
        return click.prompt("New password", hide_input=True, confirmation_prompt=True)
    return sys.stdin.readline().rstrip("\n")


def _ready_engine(site: Site):
    db.migrate(site.engine)
    return site.engine


@user.command("add")
@click.argument("username")
@click.option("--admin", "is_admin", is_flag=True, help="The user manages users, settings and activity.")
@click.option("--can-upload", is_flag=True, help="The user may upload files.")
@click.option("--real-name", default="", help="The user's real name.")
@click.pass_obj
def user_add(site: Site, username: str, is_admin: bool, can_upload: bool, real_name: str) -> None:
    """Create a web user; the password is asked for (or read from standard input)."""
    password = _read_new_password()
    try:
        with _ready_engine(site).begin() as connection:
            created = accounts.create_user(
                connection, username, password, is_admin=is_admin, can_upload=can_upload, real_name=real_name
            )
            _record_shell_activity(
                connection,
                UserCreatedEvent(account=created.username, is_admin=is_admin, can_upload=can_upload),
            )
    except accounts.AccountError as error:
        _fail(str(error))
    click.echo(f"created {created.username}" + (" (admin)" if is_admin else ""))


@user.command("passwd")
@click.argument("username")
@click.pass_obj
def user_passwd(site: Site, username: str) -> None:
    """Set a user's password (and sign them out everywhere); also re-activates a locked-out admin."""
    password = _read_new_password()
    try:
        with _ready_engine(site).begin() as connection:
            found = accounts.find_by_username(connection, username)
            if not found:
                raise accounts.AccountError(f"no user {username!r}")
            accounts.set_password(connection, found.id, password)
            _record_shell_activity(connection, UserChangedEvent(account=found.username, changed=["password"]))
    except accounts.AccountError as error:
        _fail(str(error))
    click.echo(f"password of {found.username} changed")


@user.command("list")
@click.pass_obj
def user_list(site: Site) -> None:
    """One line per user: name, flags, last sign-in (tab-separated, for scripts)."""
    with _ready_engine(site).connect() as connection:
        for account in accounts.list_users(connection):
            flags = [
                name
                for name, on in (
                    ("admin", account.is_admin),
                    ("active", account.is_active),
                    ("upload", account.can_upload),
                )
                if on
            ]
            last = (
                account.last_login_at.isoformat(timespec="seconds") + "Z"
                if account.last_login_at
                else "never"
            )
            click.echo(f"{account.username}\t{','.join(flags) or '-'}\t{last}\t{account.real_name}")


def _shell_user() -> str:
    return f"shell:{getpass.getuser()}"


def _record_shell_activity(
    connection, event: Event, *, token_id: str = "", patient: str = "", study: str = ""
) -> None:
    """Shell changes are logged like the admin pages' ones, by the shell user's name."""
    record_activity(
        event,
        connection=connection,
        username=_shell_user(),
        token_id=token_id,
        patient=patient,
        study=study,
    )


@main.command("token")
@click.argument("study")
@click.pass_obj
def token_command(site: Site, study: str) -> None:
    """Print the patient's link of STUDY (a StudyInstanceUID or an Orthanc study id).

    The portal must be running: the study is looked up in the archive.
    """
    from control import network, nodes
    from control.orthanc import OrthancError, OrthancUnavailable
    from control.tokens import NO_BIRTH_DATE, SHARED_UID, shared, store, study_facts, unchecked_link_warning
    from control.tokens.periods import LinkPeriod

    db.migrate(site.engine)
    values = site.load_settings()
    orthanc = nodes.connect(site, values, configs.Topology.from_environment(site))
    try:
        found = orthanc.lookup(study.strip())
        orthanc_id = next((item["ID"] for item in found if item["Type"] == "Study"), study)
        facts, _view = study_facts(orthanc, orthanc_id)
        holders = shared.holders(orthanc, facts.study_uid)
    except OrthancUnavailable:
        _fail("the archive is not reachable: start the portal first (./pacs up --detach)")
    except OrthancError as error:
        if error.status != 404:
            raise
        _fail(f"no study {study!r} in the archive")
    if len(holders) > 1:
        with site.engine.begin() as connection:
            shared.flag(connection, orthanc, facts.study_uid, holders, "./pacs token")
        _fail(SHARED_UID)
    warning = unchecked_link_warning(values, facts)
    with site.engine.begin() as connection:
        token, new = store.issue(connection, site.secrets.token_key, facts, db.utcnow())
        _record_shell_activity(
            connection,
            (TokenMadeEvent if new else TokenCopiedEvent)(identity_check=NO_BIRTH_DATE if warning else None),
            token_id=token.public_id,
            patient=facts.patient_name,
            study=facts.study_uid,
        )
    period = LinkPeriod(token.accessible_until(values.token_days), db.utcnow().date())
    if period.expired:
        _fail(period.note(values.date_format))
    click.echo(network.token_link(values, token.token))
    # The link alone goes to standard output, for scripts; the person reads the rest.
    click.echo(f"pacs: {period.note(values.date_format)}", err=True)
    if warning:
        click.echo(f"pacs: {warning}", err=True)


# ---- backups, restores and the activity log's retention ----


@main.command("backup")
@click.argument("destination", type=click.Path(file_okay=False, path_type=Path))
@click.option("--keep", default=7, show_default=True, help="How many snapshots DESTINATION keeps.")
@click.pass_obj
def backup_command(site: Site, destination: Path, keep: int) -> None:
    """Back up this installation into DESTINATION, while it runs (stores go on).

    Copies the database, the archive's index, the stored files not yet in DESTINATION, the
    worklist and the secrets, with a checksum of each; see control/backup.py.
    """
    from control import backup

    if keep < 1:
        _fail("--keep must be at least 1")
    db.migrate(site.engine)
    click.echo(f"pacs: backing up {site.data} into {destination}")
    try:
        snapshot = backup.backup(site, destination, keep=keep, say=click.echo)
    except backup.BackupError as error:
        _fail(f"the backup failed: {error}")
    click.echo(f"pacs: backup complete: {snapshot}")


@main.command("restore")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--check", "check_only", is_flag=True, help="Only check the backup; write nothing.")
@click.pass_obj
def restore_command(site: Site, source: Path, check_only: bool) -> None:
    """Restore the newest backup in SOURCE into this (empty) data directory.

    SOURCE is a backup folder (its newest snapshot is restored) or one snapshot's folder. Every
    part and every stored file is checked first; a damaged backup is refused with the part named.
    """
    from control import backup

    try:
        if check_only:
            backup.check(source, say=click.echo)
            return
        click.echo(f"pacs: restoring {source} into {site.data}")
        snapshot = backup.restore(source, site, say=click.echo)
    except backup.BackupError as error:
        _fail(f"nothing was restored: {error}")
    click.echo(
        f"pacs: restored the backup of {snapshot.manifest['made_at']}; "
        f"start it with: ./pacs --data {site.data} up"
    )


@main.group("activity")
def activity_group() -> None:
    """The activity log's retention."""


@activity_group.command("prune")
@click.pass_obj
def activity_prune(site: Site) -> None:
    """Export the activity older than activity_keep_years to a file, then remove it, now."""
    from control import activity

    db.migrate(site.engine)
    keep_years = site.load_settings().activity_keep_years
    if not keep_years:
        click.echo("activity_keep_years is 0: the activity log keeps everything")
        return
    pruned = activity.prune_activity(site.engine, activity.exports_folder(site), keep_years)
    if not pruned.rows:
        click.echo(f"no activity older than {pruned.cutoff:%Y-%m-%d %H:%M} UTC")
        return
    click.echo(
        f"{pruned.rows} events older than {pruned.cutoff:%Y-%m-%d %H:%M} UTC exported to {pruned.export} "
        "and removed from the log"
    )


# ---- the archive's index and stored files ----


@main.group("archive")
def archive_group() -> None:
    """The archive's index (SQLite or PostgreSQL) and its stored files."""


@archive_group.command("move-to-postgresql")
@click.pass_obj
def archive_move(site: Site) -> None:
    """Move the archive's index from Orthanc's SQLite file to PostgreSQL (the portal stopped).

    Every instance is copied through Orthanc's own REST API into a new index on PostgreSQL and
    checked (counts and every file's MD5) before anything changes; the SQLite index and its files
    are kept beside, renamed. See control/archive_move.py.
    """
    from control import archive_move

    db.migrate(site.engine)
    try:
        moved = archive_move.move_to_postgresql(site, say=click.echo)
    except archive_move.MoveError as error:
        _fail(f"nothing was moved: {error}")
    with site.engine.begin() as connection:
        _record_shell_activity(
            connection,
            SettingsChangedEvent(changed={"archive_index": {"old": "sqlite", "new": "postgresql"}}),
        )
    click.echo(
        f"pacs: moved {moved.instances} instances of {moved.studies} studies ({moved.megabytes:.0f} MB) to "
        f"the PostgreSQL index, every file checked. The SQLite index and its files are kept in "
        f"{moved.kept}: remove that folder once the portal runs well. Start it with ./pacs up "
        "(or ./pacs up --nodes N)."
    )


@archive_group.command("orphans")
@click.option("--remove", is_flag=True, help="Remove those older than a day (the daily sweep, now).")
@click.pass_obj
def archive_orphans(site: Site, remove: bool) -> None:
    """Count the stored files that the archive's index does not name (left by a node that crashed)."""
    import psycopg

    from control import orphans

    db.migrate(site.engine)
    if configs.Topology.from_environment(site).archive_index != "postgresql":
        _fail("only an archive whose index is on PostgreSQL can be swept (Orthanc locks its SQLite index)")
    try:
        found = orphans.sweep(site, remove=remove)
    except (OSError, ValueError) as error:
        _fail(f"the storage could not be swept: {error}")
    except psycopg.Error as error:
        _fail(f"the archive's index does not answer: {str(error).strip().splitlines()[0]}")
    if remove and (found.orphans or found.recent):
        orphans.record(site, found, username=_shell_user())
    click.echo(f"pacs: {found.describe()}")


# ---- the study catalog (control/catalog) ---------------------------------------------------------


@main.group()
def catalog() -> None:
    """The study catalog the query pages search: feed, rebuild, check."""


def _archive_client(site: Site, *, spare_writer: bool = False) -> Archive:
    """The archive's client, as the running portal has it: every node (control.nodes)."""
    from control import nodes

    return nodes.connect(
        site, site.load_settings(), configs.Topology.from_environment(site), spare_writer=spare_writer
    )


def _catalog_parts(site: Site):
    """The database (migrated) and the archive's client."""
    db.migrate(site.engine)
    return site.engine, _archive_client(site)


@catalog.command("feed")
@click.pass_obj
def catalog_feed(site: Site) -> None:
    """Follow the archive's change log into the catalog until stopped (the runner starts this)."""
    import logging
    import signal
    import threading

    import sqlalchemy as sa

    from control.catalog.feeder import Feeder

    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    log = logging.getLogger("pacs.catalog")
    log.setLevel(logging.INFO)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # The control plane's set-up makes the secrets and the schema (in compose, in another
    # container that may start later): wait for them rather than make secrets of its own or exit
    # (the runner gives up on a process that keeps dying).
    secrets_given = os.environ.get("PACS_SECRET_ORTHANC_USER") and os.environ.get(
        "PACS_SECRET_ORTHANC_PASSWORD"
    )
    while not stop.is_set():
        try:
            if secrets_given or (site.secrets_dir / "secrets.json").exists():
                orthanc = _archive_client(site, spare_writer=True)
                break
            log.info("the installation is not set up yet: waiting")
        except sa.exc.SQLAlchemyError as error:
            log.warning("the database is not ready (%s): waiting", type(error).__name__)
        stop.wait(2)
    else:
        return
    Feeder(site.engine, orthanc).run(stop)


@catalog.command("status")
@click.pass_obj
def catalog_status(site: Site) -> None:
    """Say how far the catalog has followed the archive, and who feeds it."""
    from control.catalog import store
    from control.orthanc import OrthancUnavailable

    engine, orthanc = _catalog_parts(site)
    with engine.connect() as connection:
        state = store.read_state(connection)
    try:
        last: int | str = int(orthanc.get_json("/changes", params={"last": ""}).get("Last", 0))
    except OrthancUnavailable:
        last = "unknown (the archive is not reachable)"
    now = db.utcnow()

    def ago(moment) -> str:
        return f"{(now - moment).total_seconds():.1f} s ago" if moment else "never"

    click.echo(f"status:       {state.status}")
    click.echo(f"studies:      {state.studies:,} studies of {state.patients:,} patients")
    click.echo(f"applied:      change {state.applied_seq:,} of the archive's {last}")
    click.echo(f"feeder:       {state.feeder or 'none yet'}, last heard {ago(state.heartbeat_at)}")
    click.echo(f"caught up:    {ago(state.caught_up_at)}")
    click.echo(f"last build:   {ago(state.built_at)}")
    if state.status == "building":
        click.echo(f"building:     {state.build_done:,} of {state.build_total:,} studies")


@catalog.command("rebuild")
@click.pass_obj
def catalog_rebuild(site: Site) -> None:
    """Make the catalog again from the archive (the pages ask the archive meanwhile)."""
    import time

    from control.catalog import store
    from control.catalog.feeder import Feeder, feeder_name
    from control.catalog.freshness import FEEDER_SILENT
    from control.orthanc import OrthancUnavailable

    engine, orthanc = _catalog_parts(site)
    feeder = Feeder(engine, orthanc, name=f"{feeder_name()} (./pacs catalog rebuild)")

    def show(done: int, total: int) -> None:
        click.echo(f"\r  {done:,} of {total:,} studies", nl=False)

    try:
        if feeder.lock.try_acquire():
            try:
                click.echo("pacs: rebuilding the catalog from the archive")
                feeder.build(progress=show)
            finally:
                feeder.lock.release()
        else:
            # The running portal's feeder holds the catalog: it does the build, between two batches.
            with engine.begin() as connection:
                requested = db.utcnow()
                store.update_state(connection, build_requested_at=requested)
            click.echo("pacs: the running feeder rebuilds the catalog")
            heard, heard_at = None, time.monotonic()
            while True:
                time.sleep(1)
                with engine.connect() as connection:
                    state = store.read_state(connection)
                if state.status == "building":
                    show(state.build_done, state.build_total)
                elif state.built_at and state.built_at >= requested and state.build_requested_at is None:
                    break
                if state.heartbeat_at != heard:
                    heard, heard_at = state.heartbeat_at, time.monotonic()
                elif time.monotonic() - heard_at > FEEDER_SILENT:
                    _fail(
                        f"the feeder holding the catalog ({state.feeder}) has not answered for "
                        f"{FEEDER_SILENT:.0f} s; it rebuilds once it answers again"
                    )
    except OrthancUnavailable:
        _fail("the archive is not reachable: start the portal first (./pacs up --detach)")
    with engine.connect() as connection:
        state = store.read_state(connection)
    click.echo(f"\npacs: the catalog holds {state.studies:,} studies of {state.patients:,} patients")


@catalog.command("check")
@click.option("--quick", is_flag=True, help="Compare which studies are listed only, not every row's columns.")
@click.pass_obj
def catalog_check(site: Site, quick: bool) -> None:
    """Compare the catalog with the archive and say what differs (exit 1 when something does)."""
    from control.catalog.check import check
    from control.orthanc import OrthancUnavailable

    engine, orthanc = _catalog_parts(site)

    def show(done: int, total: int) -> None:
        click.echo(f"\r  compared {done:,} of {total:,} rows", nl=False, err=True)

    try:
        found = check(engine, orthanc, quick=quick, progress=None if quick else show)
    except OrthancUnavailable:
        _fail("the archive is not reachable: start the portal first (./pacs up --detach)")
    if not quick:
        click.echo("", err=True)
    click.echo(f"archive: {found.archive_studies:,} studies; catalog: {found.catalog_studies:,} rows")
    for label, count, shown in (
        ("studies missing from the catalog", found.missing_count, found.missing),
        ("rows of studies the archive no longer holds", found.extra_count, found.extra),
    ):
        click.echo(f"{label}: {count:,}")
        for study_id in shown:
            click.echo(f"  {study_id}")
    if not quick:
        click.echo(f"rows that differ from the archive: {found.differing_count:,} of {found.compared_rows:,}")
        for study_id, columns in found.differing:
            click.echo(f"  {study_id}: {', '.join(columns)}")
    if found.moved_meanwhile:
        click.echo(
            "the catalog followed the archive meanwhile: "
            "what was stored during the check may show as a difference"
        )
    sys.exit(0 if found.clean else 1)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
)
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def bench(bench_args: tuple[str, ...]) -> None:
    """Benchmark the portal against Orthanc directly, on a stack of its own (options: --help).

    The benchmark (``bench/``) starts and stops its own stack on a temporary data directory; its
    options go through unchanged. The results land in this installation's data directory.
    """
    code = subprocess.call([sys.executable, "-m", "bench", *bench_args], cwd=REPOSITORY)
    sys.exit(code)


# ---- the portal as a system service (control/runtime/service.py) ------------------------------------------


@main.group("service")
def service_group() -> None:
    """Run the portal as systemd services: started at boot, restarted by systemd, logs in the journal."""


@service_group.command("install")
@click.option("--user", "user", help="The user the portal runs as (default: the data directory's owner).")
@click.option("--print", "show", is_flag=True, help="Print the units instead; change nothing.")
@click.option(
    "--directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the units (and pacs.env) into this folder instead, and nothing else.",
)
@click.pass_obj
def service_install(site: Site, user: str | None, show: bool, directory: Path | None) -> None:
    """Write the portal's systemd units (as root), prepare the installation as its user."""
    from control.runtime import service

    environment_file = directory / "pacs.env" if directory else service.ENVIRONMENT_FILE
    if not (show or directory) and os.geteuid() != 0:
        _fail("installing systemd units needs root: sudo ./pacs service install (--print shows them)")
    try:
        account = service.Account.named(user) if user else service.default_account(site)
    except service.ServiceError as error:
        _fail(str(error))
    kept = service.kept_environment(os.environ, environment_file)
    os.environ.update(kept)  # the commands are made in the environment the units give them
    units = service.units(site, account, environment_file)
    if show:
        for name, text in units.items():
            click.echo(f"# {service.UNIT_DIRECTORY / name}\n{text}")
        click.echo(f"# {environment_file} (readable by root only): {', '.join(sorted(kept)) or 'empty'}")
        return
    if not directory and service.prepare_as(site, account, kept) != 0:
        _fail(f"the installation could not be prepared as {account.user}; no unit was installed")
    service.write(directory or service.UNIT_DIRECTORY, units, kept, environment_file)
    click.echo(f"pacs: wrote {', '.join(units)} into {directory or service.UNIT_DIRECTORY}")
    click.echo(f"pacs: the portal runs as {account.user}; its environment is in {environment_file}")
    if directory:
        return
    if not service.systemd_runs():
        click.echo("pacs: systemd does not run on this machine: the units start once it does")
        return
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    click.echo("Start it now and at every boot:  systemctl enable --now pacs.target")
    click.echo("See what runs:                   systemctl status 'pacs-*'")
    click.echo("Read the logs:                   journalctl -u 'pacs-*'")


@service_group.command("uninstall")
@click.option("--directory", type=click.Path(file_okay=False, path_type=Path), hidden=True)
def service_uninstall(directory: Path | None) -> None:
    """Stop the portal's systemd units and remove them (the data directory stays)."""
    from control.runtime import service

    if not directory and os.geteuid() != 0:
        _fail("removing systemd units needs root: sudo ./pacs service uninstall")
    folder = directory or service.UNIT_DIRECTORY
    environment_file = directory / "pacs.env" if directory else service.ENVIRONMENT_FILE
    found = service.installed(folder)
    if not found:
        click.echo(f"pacs: no unit of the portal in {folder}")
        return
    running = not directory and service.systemd_runs()
    if running:
        subprocess.run(["systemctl", "disable", "--now", service.TARGET], check=False)
    for path in [*found, environment_file]:
        path.unlink(missing_ok=True)
    if running:
        subprocess.run(["systemctl", "daemon-reload"], check=True)
    click.echo(f"pacs: removed {', '.join(path.name for path in found)} and {environment_file}")


@service_group.command("relay", hidden=True, context_settings={"ignore_unknown_options": True})
@click.option("--name", required=True)
@click.option("--log", "log", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def service_relay(name: str, log: Path, argv: tuple[str, ...]) -> None:
    """Run a program, its output to the journal and to its log file (a unit's command)."""
    from control.runtime import service

    sys.exit(service.relay(name, log, list(argv)))


@service_group.command("wait", hidden=True)
@click.argument("name")
@click.pass_obj
def service_wait(site: Site, name: str) -> None:
    """Wait until a process of the stack answers (a unit's ExecStartPost)."""
    from control.runtime import service

    sys.exit(
        0 if service.wait_ready(site, name, say=lambda text: click.echo(f"pacs: {text}", err=True)) else 1
    )
