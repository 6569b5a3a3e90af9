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

import click

from control import accounts, db, stack
from control import settings as site_settings
from control.activity import Action, record_activity
from control.network import local_address
from control.site import REPOSITORY, Site


def _fail(message: str) -> None:
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


def banner(site: Site, prepared: stack.Prepared) -> str:
    values = prepared.settings
    lines = [f"The PACS web portal of {values['institution']} is running."]
    if values["web_port"]:
        port = values["web_port"]
        if values["ssl_enabled"]:
            host = values["web_server_name"] or local_address()
            lines.append(f"  Web:    https://{host}:{port}/  (https only; http:// is sent on to it)")
        else:
            lines.append(
                f"  Web:    http://{local_address()}:{port}/  (on this machine: http://127.0.0.1:{port}/)"
            )
    else:
        lines.append("  Web:    off (web port 0)")
    lines.append(f"  DICOM:  AE title {values['dicom_aet']}, port {values['dicom_port']}")
    if prepared.admin_password:
        lines.append(
            f"  Admin:  user {stack.ADMIN_USERNAME!r}, password {prepared.admin_password}  "
            "(shown this once: note it now)"
        )
    lines.append(f"  Data:   {site.data}  (logs in {site.logs})")
    return "\n".join(lines)


@main.command()
@click.option("--detach", is_flag=True, help="Run in the background; stop with ./pacs down.")
@click.option("--quiet", is_flag=True, hidden=True)
@click.pass_obj
def up(site: Site, detach: bool, quiet: bool) -> None:
    """Set up what is missing and run the portal (Ctrl-C stops it)."""
    try:
        prepared = stack.prepare(site)
        if detach:
            running = stack.running_supervisor(site)
            if running:
                _fail(f"the portal of {site.data} already runs (pid {running}); ./pacs down stops it")
            stack.check_ports(prepared.settings)
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
    for name in ("orthanc", "control", "caddy"):
        click.echo(f"  {name:8} " + (f"running, pid {parts[name]}" if name in parts else "not running"))
    if parts.get("control"):
        try:
            code, body = stack.get_over_unix_socket(site.run / "control.sock", "/healthz")
            click.echo(f"  health   {json.loads(body).get('status', code)}")
        except OSError as error:
            click.echo(f"  health   unknown ({error})")
    sys.exit(0 if supervisor else 3)


@main.command()
@click.pass_obj
def prepare(site: Site) -> None:
    """Set up the data directory and generated configs, then exit."""
    stack.prepare(site)


@main.command()
@click.pass_obj
def serve(site: Site) -> None:
    """Set up, then run the control plane alone in the foreground (the control container's command)."""
    prepared = stack.prepare(site)
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
        click.echo(f"{setting.name} = {json.dumps(values[setting.name], ensure_ascii=False)}")


@config.command("docs")
def config_docs() -> None:
    """Print the settings table of the documentation (README.md holds the same)."""
    click.echo(site_settings.markdown_table(), nl=False)


@config.command("set")
@click.argument("name")
@click.argument("value")
@click.pass_obj
def config_set(site: Site, name: str, value: str) -> None:
    """Change one setting and apply it to the running portal, as the setup page does."""
    from control import apply, tls

    setting = site_settings.BY_NAME.get(name)
    if not setting:
        _fail(f"no setting {name!r}; ./pacs config show lists them")
    try:
        parsed = setting.parse(value)
    except ValueError as error:
        _fail(str(error))
    from control import configs

    if name in configs.PORT_SETTINGS and configs.Topology.from_environment(site).ports_fixed:
        _fail(f"{name} is fixed by compose.yaml in this installation: change the port mapping there")
    db.migrate(site.engine)
    try:
        with site.engine.begin() as connection:
            current = site_settings.with_defaults(db.get_settings(connection))
            if name == "ssl_enabled" and parsed and tls.stored_facts(site.secrets_dir / "tls") is None:
                _fail("SSL needs a certificate and key first: ./pacs config certificate CRT KEY")
            changes_port = name in ("web_port", "dicom_port") and parsed and parsed != current[name]
            if changes_port and not stack.port_is_free(parsed):
                _fail(f"port {parsed} is used by another program")
            db.put_settings(connection, {name: parsed})
            if parsed != current[name]:
                _record_shell_activity(
                    connection, Action.SETTINGS_CHANGED, setting=name, old=current[name], new=parsed
                )
            # Inside the transaction: if the running web front refuses it, nothing is stored.
            loaded = apply.apply_web_settings(site, {**current, name: parsed})
    except apply.ApplyError as error:
        _fail(f"the running portal refused it, nothing changed: {error}")
    click.echo(f"{name} = {json.dumps(parsed, ensure_ascii=False)}")
    if name in apply.ARCHIVE_SETTINGS and apply.restart_archive(site, {**current, name: parsed}):
        click.echo("the archive restarts with it")
    elif name in apply.NEXT_START_SETTINGS or name in apply.ARCHIVE_SETTINGS:
        click.echo("applies at the next start")
    elif loaded:
        click.echo("applied to the running portal")


@config.command("certificate")
@click.argument("certificate", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def config_certificate(site: Site, certificate: Path, key: Path) -> None:
    """Check and install the site's certificate (.crt) and private key (.key) for SSL."""
    from control import tls

    try:
        facts = tls.check_pair(certificate.read_bytes(), key.read_bytes())
    except tls.CertificateError as error:
        _fail(str(error))
    tls.store_pair(site.secrets_dir / "tls", certificate.read_bytes(), key.read_bytes())
    db.migrate(site.engine)
    with site.engine.begin() as connection:
        _record_shell_activity(connection, Action.SETTINGS_CHANGED, certificate=facts.describe())
    click.echo(f"certificate installed: {facts.describe()}")
    click.echo("turn SSL on with: ./pacs config set ssl_enabled yes")


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
                Action.USER_CREATED,
                account=created.username,
                is_admin=is_admin,
                can_upload=can_upload,
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
            _record_shell_activity(
                connection, Action.USER_CHANGED, account=found.username, changed=["password"]
            )
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


def _record_shell_activity(
    connection, action: Action, *, token_id: str = "", patient: str = "", study: str = "", **detail
) -> None:
    """Shell changes are logged like the admin pages' ones, by the shell user's name."""
    record_activity(
        action,
        connection=connection,
        username=f"shell:{getpass.getuser()}",
        token_id=token_id,
        patient=patient,
        study=study,
        **detail,
    )


@main.command("token")
@click.argument("study")
@click.pass_obj
def token_command(site: Site, study: str) -> None:
    """Print the patient's link of STUDY (a StudyInstanceUID or an Orthanc study id).

    The portal must be running: the study is looked up in the archive.
    """
    from control import configs, network
    from control.orthanc import Orthanc, OrthancError, OrthancUnavailable
    from control.tokens import SHARED_UID, shared, store, study_facts
    from control.tokens.periods import LinkPeriod

    db.migrate(site.engine)
    values = site.load_settings()
    topology = configs.Topology.from_environment(site)
    orthanc = Orthanc(
        configs.orthanc_url(values, topology), site.secrets.orthanc_user, site.secrets.orthanc_password
    )
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
    with site.engine.begin() as connection:
        token, new = store.issue(connection, site.secrets.token_key, facts, db.utcnow())
        _record_shell_activity(
            connection,
            Action.TOKEN_MADE if new else Action.TOKEN_COPIED,
            token_id=token.public_id,
            patient=facts.patient_name,
            study=facts.study_uid,
        )
    period = LinkPeriod(token.accessible_until(values["token_days"]), db.utcnow().date())
    if period.expired:
        _fail(period.note(values["date_format"]))
    click.echo(network.token_link(values, token.token))
    # The link alone goes to standard output, for scripts; the person reads the rest.
    click.echo(f"pacs: {period.note(values['date_format'])}", err=True)


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
