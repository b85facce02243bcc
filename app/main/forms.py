"""Forms of the admin pages."""

from wtforms import StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Regexp

from ..hosts import NAME_RE
from ..inputs import TextForm
from ..labels import MAX_KEY_LENGTH, MAX_LABELS, MAX_VALUE_LENGTH

LABELS_HELP = (
    f"key=value pairs, separated by spaces or new lines (at most {MAX_LABELS}), e.g. env=prod tier=web. "
    f"Keys: up to {MAX_KEY_LENGTH} letters, digits, '.', '_', '/', '-'; values: up to {MAX_VALUE_LENGTH} "
    "letters, digits, '.', '_', '-'."
)
#: Room for the most labels there can be, written out in full.
LABELS_TEXT_MAX = MAX_LABELS * (MAX_KEY_LENGTH + MAX_VALUE_LENGTH + 2)


class AddHostForm(TextForm):
    name = StringField(
        "Host name",
        validators=[
            DataRequired(),
            Length(max=128),
            Regexp(NAME_RE, message="Use letters, digits, '.', '_' or '-' (at most 128 characters)."),
        ],
        description="A name for the machine, e.g. web-1 or db.example.org",
    )
    labels = StringField("Labels (optional)", validators=[Length(max=LABELS_TEXT_MAX)], description=LABELS_HELP)


class LabelsForm(TextForm):
    labels = TextAreaField("Labels", validators=[Length(max=LABELS_TEXT_MAX)], description=LABELS_HELP)
