"""The Tornado application: routes and the services handlers get."""

from __future__ import annotations

from typing import Callable

import logging

from tornado import web

from service.config import Config
from service.runtime.metrics import DatabaseGauges
from service.fetch.netpolicy import AddressPolicy
from service.intake.admission import Admission
from service.storage.store import TaskStore

from .base import NotFoundHandler
from .ops import HealthHandler, MetricsHandler, OpenAPIHandler
from .tasks import CheckHandler, SubmitHandler, TaskHandler


def make_app(config: Config, store: TaskStore, wake: Callable[[], None],
             expect_workers: bool = True,
             gauges: DatabaseGauges | None = None) -> web.Application:
    services = dict(store=store, wake=wake, mail_enabled=config.mail_enabled,
                    policy=AddressPolicy(config.allow_private_urls, config.allow_networks),
                    expect_workers=expect_workers,
                    gauges=gauges or DatabaseGauges(store, config.metrics_db_interval),
                    admission=Admission(store, config.max_pending_per_client,
                                        config.max_queued),
                    client_ip_header=config.client_ip_header)
    routes = [
        (r"/submit", SubmitHandler),
        (r"/check", CheckHandler),
        (r"/tasks/([^/]+)", TaskHandler),
        (r"/health", HealthHandler),
        (r"/metrics", MetricsHandler),
        (r"/openapi.yaml", OpenAPIHandler),
    ]
    return web.Application(
        [(path, handler, services) for path, handler in routes],
        default_handler_class=NotFoundHandler, default_handler_args=services,
        compress_response=False, xheaders=False, log_function=log_request)


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
