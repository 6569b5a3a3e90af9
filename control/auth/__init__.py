"""Sign-in and sign-out for web users (physicians and admins).

One generic message answers an unknown user, a wrong password and an inactive account alike, and
all three cost one password hash, so neither the text nor the timing tells which it was. After
sign-in the browser goes to ``next`` only when that is a path on this site.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, current_app, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user
from flask_wtf import FlaskForm
from wtforms import HiddenField, PasswordField, StringField
from wtforms.validators import DataRequired, Length

from control import accounts
from control.activity import Action, Outcome, record_activity
from control.auth import sessions
from control.auth.sessions import SignedInUser

bp = Blueprint("auth", __name__)

GENERIC_FAILURE = "The username or password is not correct, or the account is not active."


class SignInForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])
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
    if form.validate_on_submit():
        engine = current_app.extensions["site"].engine
        with engine.begin() as connection:
            account = accounts.authenticate(connection, form.username.data, form.password.data)
            if account is None:
                record_activity(
                    Action.SIGN_IN, Outcome.REFUSED, username=form.username.data, connection=connection
                )
            else:
                user = sessions.start_session(connection, account, request.remote_addr or "")
                record_activity(
                    Action.SIGN_IN, user_id=account.id, username=account.username, connection=connection
                )
        if account is None:
            flash(GENERIC_FAILURE, "error")
            return render_template("auth/login.html", form=form), 401
        # A fresh cookie at every sign-in: nothing from before it carries over.
        session.clear()
        login_user(user)
        return redirect(safe_next(form.next.data))
    return render_template("auth/login.html", form=form)


@bp.route("/logout", methods=["POST"])
@login_required
def logout():
    # CSRFProtect has already refused a POST without the page's token.
    user: SignedInUser = current_user._get_current_object()
    sessions.end_session(user.session_id)
    record_activity(Action.SIGN_OUT)
    logout_user()
    session.clear()
    flash("You have signed out.", "info")
    return redirect(url_for("public.index"))
