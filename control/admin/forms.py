"""The admin pages' forms (Flask-WTF: every one that changes state carries a CSRF token)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import BooleanField, DateField, StringField, SubmitField
from wtforms.validators import DataRequired, Length, Optional, Regexp

from control.fields import SecretField, TextAreaText, TextField


def _trimmed(value: str | None) -> str:
    """Typed text without surrounding blanks; a field left out of the request reads as empty."""
    return (value or "").strip()


class ContactForm(FlaskForm):
    real_name = TextField("Real name", validators=[Length(max=200)], filters=[_trimmed])
    phone = TextField("Phone", validators=[Length(max=100)], filters=[_trimmed])
    email = TextField(
        "E-mail",
        filters=[_trimmed],
        validators=[
            Optional(),
            Regexp(r"^[^@\s]+@[^@\s]+$", message="Not an e-mail address."),
            Length(max=200),
        ],
    )
    notes = TextAreaText("Notes", validators=[Length(max=2000)], filters=[_trimmed])


class NewUserForm(ContactForm):
    username = TextField("Username", validators=[DataRequired(), Length(max=64)], filters=[_trimmed])
    # The help under the password fields says the site's rules: the views fill it in.
    password = SecretField("Password", validators=[DataRequired(), Length(max=1024)])
    confirm = SecretField("Confirm password", validators=[DataRequired(), Length(max=1024)])
    is_admin = BooleanField("Admin (manages users, settings and activity)")
    can_upload = BooleanField("Can upload files (DICOM, zips of DICOM, HL7 orders, PDF reports)")


class CredentialsForm(FlaskForm):
    username = TextField("Username", validators=[DataRequired(), Length(max=64)], filters=[_trimmed])
    password = SecretField("New password", validators=[Length(max=1024)])
    confirm = SecretField("Confirm new password", validators=[Length(max=1024)])


class ActivityFilterForm(FlaskForm):
    date_from = DateField("From", validators=[Optional()])
    date_to = DateField("To", validators=[Optional()])
    patient = StringField("Patient name or ID", validators=[Optional(), Length(max=64)])
    study = StringField("Study UID or accession", validators=[Optional(), Length(max=64)])
    user = StringField("User", validators=[Optional(), Length(max=64)])
    action = StringField("Kind of event", validators=[Optional(), Length(max=40)])
    address = StringField("Client address", validators=[Optional(), Length(max=64)])


class TokenForm(FlaskForm):
    extend_until = DateField("Works until", validators=[Optional()])
    revoke = SubmitField("Revoke this link")
    release = SubmitField("Release: ask the birth date again")
    save = SubmitField("Extend")
