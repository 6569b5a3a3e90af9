"""Form fields whose data is text: empty when the request does not carry them, never None.

WTForms leaves a text field's data None when a post lacks it altogether (a script's post, a
hostile client; a browser always sends every field of the form), and its type stubs say so of
every field. The views hand that data to code that takes text (accounts, passwords, tokens):
these fields read a missing value as empty text, which the validators then judge like an empty
field (``DataRequired`` refuses it), so that a view never meets None.
"""

from __future__ import annotations

from typing import Any

from wtforms import PasswordField, StringField, TextAreaField


class TextField(StringField):
    """A line of text."""

    data: str

    def process_data(self, value: Any) -> None:
        # The field's default, or the object's value: None, unless a view gave one.
        self.data = "" if value is None else value


class TextAreaText(TextField, TextAreaField):
    """Lines of text."""


class SecretField(TextField, PasswordField):
    """A password: never written back into the page."""
