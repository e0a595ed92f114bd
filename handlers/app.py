"""The Tornado application: the routes, and what each handler is given."""

from __future__ import annotations

import logging
from typing import Any

from tornado import web

from service.config import Config
from service.fetch.netpolicy import AddressPolicy
from service.intake.admission import Admission
from service.intake.callers import Callers
from service.intake.dispatch import Dispatch
from service.intake.ena import EnaReports
from service.intake.manifests import ManifestIntake
from service.intake.submissions import Submissions
from service.live.answers import CheckAnswers
from service.live.feeds import (
    ManifestState,
    manifest_feed,
    manifest_version,
    task_feed,
    task_version,
)
from service.live.watcher import StreamLimit, Watcher
from service.runtime.metrics import WATCH_ROUNDS, DatabaseGauges
from service.storage.store import Store

from .base import NotFoundHandler
from .events import EventsHandler
from .listing import TaskListHandler
from .manifests import ManifestHandler, ManifestsHandler
from .ops import HealthHandler, MetricsHandler, OpenAPIHandler
from .page import STATIC, PageHandler, StaticHandler
from .tasks import CheckHandler, SubmitHandler, TaskHandler


def make_app(config: Config, store: Store, dispatch: Dispatch,
             gauges: DatabaseGauges, answers: CheckAnswers | None = None) -> web.Application:
    """The routes, each handler given what it needs through initialize."""
    admission = Admission(store, config.max_pending_per_client, config.max_queued)
    policy = AddressPolicy(config.allow_private_urls, config.allow_networks)
    submissions = Submissions(store, admission, policy, config.mail_enabled, dispatch,
                              coalesce=config.coalesce,
                              webhooks=config.webhook_secret is not None,
                              max_connections=config.max_connections)
    manifests = ManifestIntake(store, admission, policy, config.mail_enabled, dispatch.wake,
                               ena=EnaReports(config))
    answers = answers if answers is not None else CheckAnswers()
    streams = dict(limit=StreamLimit(config.max_streams_per_client),
                   keepalive=config.sse_keepalive, client_ip_header=config.client_ip_header)
    routes: list[Any] = [
        (r"/submit", SubmitHandler, dict(submissions=submissions)),
        (r"/check", CheckHandler, dict(records=store.records, answers=answers)),
        (r"/tasks", TaskListHandler, dict(history=store.history)),
        (r"/tasks/([^/]+)/events", EventsHandler, dict(feed=_task_feed(store), **streams)),
        (r"/manifests/([^/]+)/events", EventsHandler,
         dict(feed=_manifest_feed(store), **streams)),
        (r"/tasks/([^/]+)", TaskHandler, dict(records=store.records,
                                              cancellations=store.cancellations,
                                              answers=answers)),
        (r"/manifests", ManifestsHandler, dict(intake=manifests)),
        (r"/manifests/([^/]+)", ManifestHandler, dict(manifests=store.manifests)),
        (r"/health", HealthHandler, dict(store=store)),
        (r"/metrics", MetricsHandler, dict(gauges=gauges)),
        (r"/openapi.yaml", OpenAPIHandler),
        (r"/", PageHandler, dict(path=str(STATIC))),
        (r"/static/(.*)", StaticHandler, dict(path=str(STATIC))),
    ]
    # Every handler asks who its caller is (JsonHandler.caller): an
    # application setting rather than one more initialize argument each.
    callers = Callers(store.keys, config.client_ip_header, config.require_api_key,
                      config.loopback_operator)
    return web.Application(
        routes, default_handler_class=NotFoundHandler,
        compress_response=False, xheaders=False, log_function=log_request, callers=callers)


def _task_feed(store: Store):
    """Every task stream of this process, fed by one watcher."""
    watcher = Watcher(store.live.tasks, task_version, WATCH_ROUNDS.labels("tasks").inc)
    return task_feed(watcher, store.records.get)


def _manifest_feed(store: Store):
    watcher = Watcher(store.live.manifests, manifest_version,
                      WATCH_ROUNDS.labels("manifests").inc)

    async def read(manifest_id: str) -> ManifestState | None:
        manifest = await store.manifests.get(manifest_id)
        return None if manifest is None else (manifest, await store.manifests.totals(manifest))

    return manifest_feed(watcher, read)


_access = logging.getLogger("tornado.access")


def log_request(handler: web.RequestHandler) -> None:
    """Tornado's access log minus the query string, which can carry email
    addresses and URLs with secrets."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if _access.isEnabledFor(level):
        request = handler.request
        _access.log(level, "%d %s %s (%s) %.2fms", status, request.method, request.path,
                    request.remote_ip, 1000.0 * request.request_time())
