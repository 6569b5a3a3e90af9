"""The admin's pages: web users and their sign-in locks, study links, the server activity log, the
modality worklist.

Only admins reach this blueprint (``control.access`` says so). Every change to an account is one
activity event naming the account and what changed, never a password. Forms that change state are
POSTs carrying a CSRF token; the account rules themselves (the last active admin stays, nobody
deletes or deactivates themselves) live in ``control.accounts``, the locks in
``control.auth.throttle``. Lifting a sign-in lock and releasing a held study link are events too.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
from collections.abc import Iterator

import sqlalchemy as sa
from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask_login import current_user

from control import accounts, db, services
from control.accounts import AccountError
from control.activity import (
    ACTION_LABELS,
    COUNT_LIMIT,
    ActivityFilter,
    ActivityList,
    EventColumns,
    action_label,
    count_activity,
    details,
    get_event,
    list_activity,
    outcome_label,
    record_activity,
    refused_by_address,
)
from control.admin import lookup
from control.admin.forms import ActivityFilterForm, ContactForm, CredentialsForm, NewUserForm, TokenForm
from control.auth import throttle
from control.catalog import tables as catalog_tables
from control.desktop import credentials as viewer_tokens
from control.events import (
    SignInLockLiftedEvent,
    TokenExtendedEvent,
    TokenIdentityReleasedEvent,
    TokenRevokedEvent,
    UserChangedEvent,
    UserCreatedEvent,
    UserDeletedEvent,
)
from control.formatting import local_time, person_name
from control.orthanc import OrthancUnavailable
from control.tokens import shared, store

bp = Blueprint("admin", __name__, url_prefix="/admin")

PAGE_SIZE = 50


def _user_or_404(connection, user_id: int) -> accounts.UserDetails:
    user = accounts.get_details(connection, user_id)
    if user is None:
        abort(404)
    return user


@bp.route("/")
def index():
    return redirect(url_for("admin.users"))


@bp.route("/users")
def users():
    with services.engine().connect() as connection:
        listed = accounts.list_users(connection)
        locks = throttle.current_locks(connection)
    names = {accounts.username_key(user.username): user.username for user in listed}
    return render_template(
        "admin/users.html", users=listed, locks=locks, names=names, lock_kinds=throttle.LockKind
    )


@bp.route("/users/locks/lift", methods=["POST"])
def lift_lock():
    """Lift one sign-in lock: the failures behind it are forgotten, the log keeps them."""
    try:
        kind = throttle.LockKind(request.form.get("kind", ""))
    except ValueError:
        abort(400)
    account_key = request.form.get("account_key", "")
    client_address = request.form.get("client_address", "")
    with services.engine().begin() as connection:
        forgotten = throttle.lift(connection, kind, account_key, client_address)
        record_activity(
            SignInLockLiftedEvent(
                lock=str(kind), account=account_key, address=client_address, failures=forgotten
            ),
            connection=connection,
        )
    what = " from ".join(part for part in (account_key, client_address) if part)
    flash(f"Lifted the sign-in lock of {what}.", "info")
    return redirect(url_for("admin.users"))


@bp.route("/users/new", methods=["GET", "POST"])
def new_user():
    form = NewUserForm()
    form.password.description = accounts.password_help(services.settings().password_min_length)
    if form.validate_on_submit():
        try:
            with services.engine().begin() as connection:
                accounts.check_new_password(
                    connection, form.password.data, form.username.data, form.confirm.data
                )
                created = accounts.create_user(
                    connection,
                    form.username.data,
                    form.password.data,
                    is_admin=form.is_admin.data,
                    can_upload=form.can_upload.data,
                    real_name=form.real_name.data,
                )
                accounts.update_contact(
                    connection,
                    created.id,
                    phone=form.phone.data,
                    email=form.email.data,
                    notes=form.notes.data,
                )
                record_activity(
                    UserCreatedEvent(
                        account=created.username, is_admin=created.is_admin, can_upload=created.can_upload
                    ),
                    connection=connection,
                )
        except AccountError as error:
            field = getattr(form, error.field, form.username)
            field.errors = [*field.errors, str(error)]
        else:
            flash(f"Created the account {created.username}.", "info")
            return redirect(url_for("admin.users"))
    return render_template("admin/user_new.html", form=form)


@bp.route("/users/<int:user_id>/edit", methods=["GET", "POST"])
def edit_user(user_id: int):
    with services.engine().connect() as connection:
        user = _user_or_404(connection, user_id)
    form = ContactForm(obj=user)
    if form.validate_on_submit():
        fields = ("real_name", "phone", "email", "notes")
        contact = {name: getattr(form, name).data for name in fields}
        changed = sorted(name for name, value in contact.items() if value != getattr(user, name))
        with services.engine().begin() as connection:
            accounts.update_contact(connection, user_id, **contact)
            if changed:
                record_activity(
                    UserChangedEvent(account=user.username, changed=changed), connection=connection
                )
        flash(f"Saved the details of {user.username}.", "info")
        return redirect(url_for("admin.users"))
    return render_template("admin/user_edit.html", form=form, user=user)


FLAGS = {"is_active": "Active", "can_upload": "Can upload files", "is_admin": "Admin"}


@bp.route("/users/<int:user_id>/flags", methods=["POST"])
def set_flag(user_id: int):
    flag = request.form.get("flag", "")
    value = request.form.get("value") == "1"
    if flag not in FLAGS:
        abort(400)
    try:
        with services.engine().begin() as connection:
            user = _user_or_404(connection, user_id)
            accounts.set_flags(connection, user_id, current_user.id, **{flag: value})
            record_activity(
                UserChangedEvent(
                    account=user.username, changed=[flag], old={flag: getattr(user, flag)}, new={flag: value}
                ),
                connection=connection,
            )
    except AccountError as error:
        flash(str(error), "error")
    else:
        flash(f"{FLAGS[flag]}: {'yes' if value else 'no'} for {user.username}.", "info")
    return redirect(url_for("admin.users"))


@bp.route("/users/<int:user_id>/credentials", methods=["GET", "POST"])
def credentials(user_id: int):
    with services.engine().connect() as connection:
        user = _user_or_404(connection, user_id)
    form = CredentialsForm(username=user.username)
    form.password.description = "Leave blank to keep it. " + accounts.password_help(
        services.settings().password_min_length
    )
    if form.validate_on_submit():
        new_name = form.username.data
        try:
            with services.engine().begin() as connection:
                changed = []
                if new_name != user.username:
                    accounts.rename(connection, user_id, new_name)
                    changed.append("username")
                if form.password.data or form.confirm.data:
                    accounts.set_password(connection, user_id, form.password.data, form.confirm.data)
                    changed.append("password")
                if not changed:
                    raise AccountError(
                        "Nothing to change: type a new username or a new password.", "username"
                    )
                renamed = "username" in changed
                record_activity(
                    UserChangedEvent(
                        account=new_name,
                        changed=changed,
                        old_username=user.username if renamed else None,
                        new_username=new_name if renamed else None,
                    ),
                    connection=connection,
                )
        except AccountError as error:
            field = getattr(form, error.field, form.username)
            field.errors = [*field.errors, str(error)]
        else:
            flash(f"Changed the {' and '.join(changed)} of {new_name}.", "info")
            return redirect(url_for("admin.users"))
    return render_template("admin/user_credentials.html", form=form, user=user)


@bp.route("/users/<int:user_id>/delete", methods=["GET", "POST"])
def delete_user(user_id: int):
    with services.engine().connect() as connection:
        user = _user_or_404(connection, user_id)
    if request.method == "POST":
        try:
            with services.engine().begin() as connection:
                accounts.delete_user(connection, user_id, current_user.id)
                record_activity(UserDeletedEvent(account=user.username), connection=connection)
        except AccountError as error:
            flash(str(error), "error")
        else:
            flash(f"Deleted the account {user.username}; its activity stays in the log.", "info")
        return redirect(url_for("admin.users"))
    return render_template("admin/user_delete.html", user=user)


@bp.route("/users/<int:user_id>")
def user_activity(user_id: int):
    with services.engine().connect() as connection:
        user = accounts.get_details(connection, user_id)
        if user is None:
            abort(404)
    return _activity_page(ActivityFilter(user_id=user_id), title=f"Activity of {user.username}", user=user)


def _filters_from_request() -> tuple[ActivityFilterForm, ActivityFilter]:
    """The filters in the query string; a bad value is shown next to its field and ignored."""
    form = ActivityFilterForm(request.args, meta={"csrf": False})
    listing = request.args.get("list", ActivityList.USERS.value)
    if listing not in {member.value for member in ActivityList}:
        abort(404)
    user_id = request.args.get("user_id", "")
    if user_id:
        if not user_id.isdigit():
            abort(404)
        return form, ActivityFilter(user_id=int(user_id))
    if not form.validate():
        return form, ActivityFilter(listing=ActivityList(listing))
    patient, study = (form.patient.data or "").strip(), (form.study.data or "").strip()
    patient_ids: tuple[str, ...] = ()
    patient_studies: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()
    if patient or study:
        with services.engine().connect() as connection:
            if patient:
                patient_ids, patient_studies, too_many = lookup.patient(connection, patient)
                if too_many:
                    form.patient.errors = [
                        f"More than {lookup.MOST_MATCHES} studies match: the first are shown; "
                        "type more of the name, or the patient ID."
                    ]
            if study:
                study_uids = lookup.study(connection, study)
    return form, ActivityFilter(
        listing=ActivityList(listing),
        date_from=form.date_from.data,
        date_to=form.date_to.data,
        user=form.user.data or "",
        action=form.action.data or "",
        address=form.address.data or "",
        patient=patient,
        study=study,
        patient_ids=patient_ids,
        patient_studies=patient_studies,
        study_uids=study_uids,
    )


def _page_number() -> int:
    try:
        return max(1, int(request.args.get("page", "1")))
    except ValueError:
        return 1


@bp.route("/activity")
def activity():
    form, filters = _filters_from_request()
    return _activity_page(filters, form=form)


def _activity_page(
    filters: ActivityFilter, *, form: ActivityFilterForm | None = None, title: str = "", user=None
):
    page = _page_number()
    time_zone = services.settings().time_zone
    grouped = not (filters.address or filters.patient or filters.study)
    with services.engine().connect() as connection:
        if filters.listing is ActivityList.REFUSED and filters.user_id is None and grouped:
            total, groups = refused_by_address(
                connection, filters, time_zone, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE
            )
            rows = None
        else:
            total = count_activity(connection, filters, time_zone, limit=COUNT_LIMIT)
            rows = list_activity(
                connection, filters, time_zone, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE
            ).all()
            groups = None
    # Past COUNT_LIMIT rows the page says "more than" and pages that far: narrower filters go further.
    more = total > COUNT_LIMIT
    pages = max(1, math.ceil(min(total, COUNT_LIMIT) / PAGE_SIZE))
    arguments = {key: value for key, value in request.args.items() if key != "page"}
    # The other lists with the same filters: "and by token?" is one click.
    filtered = {key: value for key, value in arguments.items() if key not in ("list", "user_id") and value}
    return render_template(
        "admin/activity.html",
        form=form,
        filters=filters,
        rows=rows,
        groups=groups,
        total=total,
        more=more,
        count_limit=COUNT_LIMIT,
        page=page,
        pages=pages,
        arguments=arguments,
        title=title,
        user=user,
        lists=ActivityList,
        filtered=filtered,
        actions=sorted(ACTION_LABELS.items(), key=lambda item: item[1]),
        details=details,
        action_label=action_label,
        outcome_label=outcome_label,
    )


CSV_COLUMNS = (
    "time",
    "action",
    "outcome",
    "user",
    "token_id",
    "client_address",
    "user_agent",
    "patient",
    "patient_id",
    "study",
    "detail",
    "action_code",
)


def spreadsheet_safe(cell: str) -> str:
    """Text that a spreadsheet shows as text: a leading = + - @ would make it a formula.

    Usernames typed at the sign-in page and DICOM values are attacker-controlled; an admin opening
    the export must not run what they wrote.
    """
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


@bp.route("/activity.csv")
def activity_csv():
    """The rows the activity page shows for the same filters (all pages), as CSV."""
    _form, filters = _filters_from_request()
    time_zone = services.settings().time_zone

    def generate() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        with services.engine().connect() as connection:
            for row in list_activity(connection, filters, time_zone, limit=None):
                # In words, as the page shows them; ``action_code`` for whoever filters by it.
                cells = [
                    local_time(row.at, time_zone, "%Y-%m-%d %H:%M:%S"),
                    action_label(row.action),
                    outcome_label(row.outcome),
                    row.username,
                    row.token_id,
                    row.client_address,
                    row.user_agent,
                    person_name(row.patient),
                    row.patient_id,
                    row.study,
                    "; ".join(f"{label}: {value}" for label, value in details(row.detail)),
                    row.action,
                ]
                writer.writerow([spreadsheet_safe(cell) for cell in cells])
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()

    name = f"activity-{filters.listing}-{dt.date.today().isoformat()}.csv"
    return Response(
        stream_with_context(generate()),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@bp.route("/activity/<int:event_id>")
def event(event_id: int):
    with services.engine().connect() as connection:
        row = get_event(connection, event_id)
    if row is None:
        abort(404)
    return render_template(
        "admin/event.html",
        row=row,
        details=details(row.detail),
        action_label=action_label,
        outcome_label=outcome_label,
    )


@bp.route("/tokens")
def tokens():
    """Every study token: for whom, issued, last used, uses, from where, and its state; and the
    newest viewer tokens (``control.desktop``)."""
    patient_id = request.args.get("patient_id", "").strip()
    held = request.args.get("held") == "1"
    page = _page_number()
    with services.engine().begin() as connection:
        total, listed = store.list_tokens(
            connection, patient_id=patient_id, held=held, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE
        )
        try:
            shared_uids = shared.flagged(connection, services.archive())
        except OrthancUnavailable:
            shared_uids = None
        held_count = store.count_held(connection)
        # What the study catalog knows of the listed links' studies (their descriptions).
        catalog_rows = connection.execute(
            sa.select(catalog_tables.studies.c.study_id, catalog_tables.studies.c.description).where(
                catalog_tables.studies.c.study_id.in_({token.row.orthanc_study_id for token in listed})
            )
        ).all()
        descriptions = {row.study_id: row.description for row in catalog_rows}
        # Tokens of the desktop viewer and of other viewers, newest first, to revoke from here.
        viewer_listed = viewer_tokens.listing(connection, services.settings(), patient_id=patient_id)
    today = dt.date.today()
    arguments = {"patient_id": patient_id} if patient_id else {}
    if held:
        arguments["held"] = "1"
    return render_template(
        "admin/tokens.html",
        shared_uids=shared_uids,
        tokens=listed,
        total=total,
        page=page,
        pages=max(1, math.ceil(total / PAGE_SIZE)),
        patient_id=patient_id,
        token_days=services.settings().token_days,
        today=today,
        now=db.utcnow(),
        held=held,
        held_count=held_count,
        arguments=arguments,
        viewer_listed=viewer_listed,
        descriptions=descriptions,
    )


@bp.route("/tokens/<int:token_id>", methods=["GET", "POST"])
def token(token_id: int):
    """One token: its uses, and the admin's two levers: extend it, or revoke it."""
    with services.engine().connect() as connection:
        found = store.get(connection, token_id)
    if found is None:
        abort(404)
    form = TokenForm()
    if form.validate_on_submit():
        with services.engine().begin() as connection:
            about: EventColumns = {
                "token_id": found.public_id,
                "patient": found.row.patient_name,
                "study": found.row.study_uid,
            }
            if form.release.data:
                store.release_identity(connection, token_id)
                record_activity(TokenIdentityReleasedEvent(), connection=connection, **about)
                flash("Released: the link asks for the date of birth again, with a fresh count.", "info")
            elif form.revoke.data:
                store.revoke(connection, token_id, db.utcnow())
                record_activity(TokenRevokedEvent(), connection=connection, **about)
                flash(
                    "Revoked: the link no longer works. The next link made for this study will be new.",
                    "info",
                )
            elif form.extend_until.data:
                old = found.accessible_until(services.settings().token_days)
                store.extend(connection, token_id, form.extend_until.data)
                record_activity(
                    TokenExtendedEvent(old=old.isoformat(), new=form.extend_until.data.isoformat()),
                    connection=connection,
                    **about,
                )
                flash(f"The link now works until {form.extend_until.data.isoformat()}.", "info")
        return redirect(url_for("admin.token", token_id=token_id))
    return render_template(
        "admin/token.html",
        token=found,
        form=form,
        token_days=services.settings().token_days,
        state=found.state(services.settings().token_days, dt.date.today()),
        now=db.utcnow(),
        lock_steps=len(store.IDENTITY_LOCKS),
    )


@bp.route("/tokens/revoke-patient", methods=["POST"])
def revoke_patient():
    """Revoke every live link to one patient's studies."""
    patient_id = request.form.get("patient_id", "").strip()
    if not patient_id:
        abort(400)
    with services.engine().begin() as connection:
        count = store.revoke_patient(connection, patient_id, db.utcnow())
        record_activity(TokenRevokedEvent(revoked=count), connection=connection, patient_id=patient_id)
    flash(f"Revoked {count} link{'s' if count != 1 else ''} of patient {patient_id}.", "info")
    return redirect(url_for("admin.tokens", patient_id=patient_id))


# The setup page's and the worklist's routes live in their own modules; importing them registers
# them on this blueprint.
from control.admin import setup, worklist  # noqa: E402, F401
