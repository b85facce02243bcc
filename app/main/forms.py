"""Forms of the admin pages."""

from wtforms import StringField
from wtforms.validators import DataRequired, Length, Regexp

from ..hosts import NAME_RE
from ..inputs import TextForm


class AddHostForm(TextForm):
    name = StringField(
        "Host name",
        validators=[
            DataRequired(),
            Length(max=128),
            Regexp(NAME_RE, message="Use letters, digits, '.', '_' or '-' (at most 128 characters)."),
        ],
        description="A label for the machine, e.g. web-1 or db.example.org",
    )
