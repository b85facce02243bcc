"""Werkzeug's URL builders compiled once per test run instead of once per app.

Every test builds its own app (``create_app``), and binding each of its ~50 URL rules makes
werkzeug generate and ``compile()`` two small builder functions per rule: two thirds of the CPU
``create_app`` takes. The builder is a pure function of the rule's parsed parts (it receives the
rule as its first argument and reads the converters from it at call time), so rules with the
same parts can share it. Rules with ``defaults`` (whose values are baked into the code through
their converters) are compiled as usual. If werkzeug changes this private method's shape, the
cache switches itself off and everything is compiled as before.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_builders: dict = {}


def install() -> None:
    from werkzeug.routing.rules import Rule

    original = getattr(Rule, "_compile_builder", None)
    if original is None or getattr(original, "_rm_cached", False):
        return

    def compile_builder(self, append_unknown: bool = True):
        trace = getattr(self, "_trace", None)
        if self.defaults or not isinstance(trace, list):
            return original(self, append_unknown)
        key = (append_unknown, self.rule, tuple(trace))
        with _lock:
            builder = _builders.get(key)
            if builder is None:
                builder = _builders[key] = original(self, append_unknown)
        return builder

    compile_builder._rm_cached = True
    Rule._compile_builder = compile_builder
