"""Agent self-update: release artifacts, single-host dispatch, the watcher, and fleet rollouts.

One operation here touches host, job, alert, audit and the live socket, so it lives in its own
capability package rather than in a view or a model.
"""

from __future__ import annotations

from flask import Flask

from ..runtime import runtime


def init_app(app: Flask) -> None:
    """Subscribe the fleet rollout to the watcher's announcements, the watcher to host removals and hellos."""
    from . import dispatch, fleet, watcher

    rt = runtime(app)
    rt.job_ended.subscribe(fleet.on_job_ended)
    rt.job_corrected.subscribe(fleet.correct_host_row)
    rt.host_removed.subscribe(watcher.on_host_removed)
    rt.update_routed.subscribe(dispatch.deliver)
    if rt.presence is not None:  # a hello at its job's target ends the job in the hello's own commit
        rt.presence.hello_hooks.append(watcher.succeed_with_hellos)
