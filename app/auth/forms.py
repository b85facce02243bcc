"""Forms of the auth area (Flask-WTF: every one carries a CSRF token)."""

from flask_wtf import FlaskForm
from wtforms import HiddenField, PasswordField, StringField
from wtforms.validators import DataRequired, Length


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])
    next = HiddenField()


class TokenForm(FlaskForm):
    name = StringField("Name", validators=[Length(max=100)], description="What the token is for, e.g. 'ci deploy'")


class EmptyForm(FlaskForm):
    """A form with only its CSRF token: for POST buttons (logout, revoke, delete)."""
