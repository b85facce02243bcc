"""schemathesis drives docs/openapi.json against the live server with an admin and a viewer token.

Every generated request (valid and invalid ones: positive and negative generation, the coverage
phase's boundary values) must get an answer that passes every schemathesis check: no 5xx, a
documented status code and content type, a body matching the documented schema, and so on.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from tests.support.live import ROOT

SPEC = os.path.join(ROOT, "docs", "openapi.json")
# Each operation's test stands alone (its own requests, two module-made tokens), and the 41 together
# take minutes: under scripts/test they run as 3 groups, each with its own live server (tests/conftest.py).
XDIST_GROUPS = 3

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 20261129,
        "generation": {"mode": "all", "max-examples": 15, "deterministic": True},
        "phases": {"stateful": {"enabled": False}},
        # A well-formed rollout request the fleet's state cannot honour (no host behind, ids of no
        # host) is 422 by design (docs/api.md); every other check runs with its defaults.
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
            }
        },
    }
)
schema = schemathesis.openapi.from_path(SPEC, config=CONFIG)


@schema.hook
def filter_body(context, body) -> bool:
    """Keep label keys within their syntax (docs/api.md): OpenAPI 3.0 has no ``propertyNames`` to say it.

    Without this, a "valid" body would carry random Unicode keys that the server rightly refuses
    (400 ``invalid_labels``, tested in tests/updates/test_selection.py).
    """
    from app.labels import KEY_RE

    labels = body.get("labels") if isinstance(body, dict) else None
    return not isinstance(labels, dict) or all(KEY_RE.fullmatch(k) for k in labels)


@pytest.fixture(scope="module")
def tokens(module_live, module_app):
    from app.extensions import db
    from app.models import ApiToken, Host, User

    out = {}
    for role in ("admin", "viewer"):
        user = User(username=f"st-{role}", role=role)
        user.set_password(f"{role}-pass-123")
        db.session.add(user)
        _, out[role] = ApiToken.issue(user, "schemathesis")
    for name in ("st-a", "st-b"):
        Host.enrol(name)
    db.session.commit()
    return out


@schema.parametrize()
def test_every_answer_matches_the_spec(case, module_live, tokens):
    for role in ("admin", "viewer"):
        case.call_and_validate(
            base_url=module_live.admin_url, headers={"Authorization": f"Bearer {tokens[role]}"}, timeout=10
        )
