"""docs/openapi.json is a valid OpenAPI document and describes exactly the /api routes the app has."""

import json
import os
import re

from openapi_spec_validator import validate

from tests.support.live import ROOT

SPEC = os.path.join(ROOT, "docs", "openapi.json")


def load():
    with open(SPEC) as f:
        return json.load(f)


def test_the_spec_is_valid_openapi():
    validate(load())


def test_the_spec_lists_every_api_route_and_nothing_else(app):
    in_app = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            in_app |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    in_spec = {(p, m) for p, ops in load()["paths"].items() for m in ops}
    assert in_app == in_spec, f"only in the app: {in_app - in_spec}; only in the spec: {in_spec - in_app}"
