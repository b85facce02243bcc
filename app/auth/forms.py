"""Forms of the auth area (Flask-WTF: every one carries a CSRF token)."""

from wtforms import HiddenField, PasswordField, StringField
from wtforms.validators import DataRequired, Length, Regexp

from ..inputs import TextForm


class LoginForm(TextForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])
    next = HiddenField()


class TokenForm(TextForm):
    name = StringField(
        "Name",
        validators=[Length(max=100), Regexp(r"^[^\x00-\x1f\x7f]*\Z", message="No control characters.")],
        description="What the token is for, e.g. 'ci deploy'",
    )


class EmptyForm(TextForm):
    """A form with only its CSRF token: for POST buttons (logout, revoke, delete)."""
