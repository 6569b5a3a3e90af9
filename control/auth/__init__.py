"""Sign-in and sign-out for web users (physicians and admins).

One generic message answers an unknown user, a wrong password and an inactive account alike, and
all three cost one password hash, so neither the text nor the timing tells which it was. After
sign-in the browser goes to ``next`` only when that is a path on this site.
"""

from __future__ import annotations

import math
from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_user, logout_user
from flask_wtf import FlaskForm
from wtforms import HiddenField
from wtforms.validators import DataRequired, Length

from control import accounts, services
from control.activity import Outcome, record_activity
from control.auth import sessions, throttle
from control.auth.sessions import SignedInUser
from control.events import LockedOutEvent, SignInEvent, SignOutEvent, UserChangedEvent
from control.fields import SecretField, TextField

bp = Blueprint("auth", __name__)

GENERIC_FAILURE = "The username or password is not correct, or the account is not active."
_ASK_ADMIN = "ask the site's administrator if you have forgotten your password."
LOCKED_MESSAGES = {
    throttle.LockKind.ACCOUNT_FROM_ADDRESS: "Too many failed sign-ins for this account from your address. "
    "Sign-in is blocked here for {minutes} more minute{s}; " + _ASK_ADMIN,
    throttle.LockKind.ADDRESS: "Too many failed sign-ins from your address. Sign-in is blocked here for "
    "{minutes} more minute{s}; " + _ASK_ADMIN,
    throttle.LockKind.ACCOUNT: "Too many failed sign-ins for this account from many places. For "
    "{minutes} more minute{s} it can be signed in to only from where it was used lately; the site's "
    "administrator can lift this.",
}


class SignInForm(FlaskForm):
    username = TextField("Username", validators=[DataRequired(), Length(max=64)])
    password = SecretField("Password", validators=[DataRequired(), Length(max=1024)])
    next = HiddenField()


def safe_next(target: str | None) -> str:
    """``target`` when it is a local path, else the home page."""
    if not target:
        return url_for("public.index")
    parts = urlsplit(target)
    if (
        parts.scheme
        or parts.netloc
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
    ):
        return url_for("public.index")
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():
    form = SignInForm()
    if request.method == "GET":
        form.next.data = request.args.get("next", "")
        return render_template("auth/login.html", form=form)
    if not form.validate_on_submit():
        return render_template("auth/login.html", form=form), 400
    client_address = request.remote_addr or ""
    typed_name = form.username.data.strip()
    engine = services.engine()
    password_problem = None
    with engine.begin() as connection:
        verdict = throttle.check(connection, typed_name, client_address)
        lock = verdict.lock
        if lock is not None:
            record_activity(
                LockedOutEvent(lock=str(lock.kind)),
                Outcome.REFUSED,
                username=typed_name,
                connection=connection,
            )
        else:
            account = accounts.authenticate(connection, typed_name, form.password.data)
            if account is None:
                throttle.record_failure(connection, typed_name, client_address)
                record_activity(SignInEvent(), Outcome.REFUSED, username=typed_name, connection=connection)
            else:
                throttle.record_success(connection, typed_name, client_address)
                password_problem = accounts.stored_password_problem(connection, account.id)
                user = sessions.start_session(connection, account, client_address)
                record_activity(
                    SignInEvent(), user_id=account.id, username=account.username, connection=connection
                )
    if lock is not None:
        minutes = max(1, math.ceil((lock.until - verdict.now).total_seconds() / 60))
        flash(LOCKED_MESSAGES[lock.kind].format(minutes=minutes, s="s" if minutes > 1 else ""), "error")
        return render_template("auth/login.html", form=form), 429
    if account is None:
        throttle.slow_down(verdict)
        flash(GENERIC_FAILURE, "error")
        return render_template("auth/login.html", form=form), 401
    # A fresh cookie at every sign-in: nothing from before it carries over.
    session.clear()
    login_user(user)
    if password_problem:
        flash(
            f"Your password falls short of this site's rules ({password_problem}): please change it "
            "now (Password, at the top of the page).",
            "error",
        )
    return redirect(safe_next(form.next.data))


class OwnPasswordForm(FlaskForm):
    current = SecretField("Current password", validators=[DataRequired(), Length(max=1024)])
    password = SecretField("New password", validators=[DataRequired(), Length(max=1024)])
    confirm = SecretField("Confirm new password", validators=[DataRequired(), Length(max=1024)])


@bp.route("/account/password", methods=["GET", "POST"])
def own_password():
    """A signed-in user changes their own password; their other sessions end, this one goes on."""
    form = OwnPasswordForm()
    if form.validate_on_submit():
        user: SignedInUser = current_user._get_current_object()
        renewed = None
        with services.engine().begin() as connection:
            if accounts.authenticate(connection, user.username, form.current.data) is None:
                form.current.errors = [*form.current.errors, "This is not your current password."]
            else:
                try:
                    account = accounts.set_password(
                        connection, user.id, form.password.data, form.confirm.data
                    )
                except accounts.AccountError as error:
                    field = getattr(form, error.field or "password")
                    field.errors = [*field.errors, str(error)]
                else:
                    renewed = sessions.start_session(connection, account, request.remote_addr or "")
                    record_activity(
                        UserChangedEvent(account=user.username, changed=["own password"]),
                        connection=connection,
                    )
        if renewed is not None:
            session.clear()
            login_user(renewed)
            flash("Your password is changed. Your other sessions have ended.", "info")
            return redirect(url_for("public.index"))
    return render_template(
        "auth/own_password.html",
        form=form,
        password_help=accounts.password_help(services.settings().password_min_length),
    )


@bp.route("/logout", methods=["POST"])
def logout():
    # CSRFProtect has already refused a POST without the page's token.
    user: SignedInUser = current_user._get_current_object()
    sessions.end_session(user.session_id)
    record_activity(SignOutEvent())
    logout_user()
    session.clear()
    flash("You have signed out.", "info")
    return redirect(url_for("public.index"))
