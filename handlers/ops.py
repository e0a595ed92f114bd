"""Endpoints for operators and tools: health, metrics, the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

from service.runtime import metrics
from service.storage.store import Store

from .base import JsonHandler

OPENAPI = Path(__file__).resolve().parent.parent / "openapi.yaml"
# A worker counts as alive if it sent a heartbeat this recently.
HEARTBEAT_WITHIN = 10


class HealthHandler(JsonHandler):
    open_without_key = True

    def initialize(self, store: Store) -> None:
        self.store = store

    async def get(self) -> None:
        report: dict = {"database": "ok", "workers": 0}
        stuck: list[str] = []
        try:
            # One deadline for both calls.
            report["workers"], stuck = await self.db(self._probe())
        except Exception:  # noqa: BLE001 - any failure here means unhealthy
            report["database"] = "unreachable"
        if stuck:
            report["stuck_workers"] = stuck
        healthy = report["database"] == "ok" and not stuck and report["workers"] > 0
        report["status"] = "ok" if healthy else "unhealthy"
        self.send(200 if healthy else 503, report)

    async def _probe(self) -> tuple[int, list[str]]:
        await self.store.ping()
        return await self.store.liveness.live_workers(within=HEARTBEAT_WITHIN)


class MetricsHandler(JsonHandler):
    open_without_key = True

    def initialize(self, gauges: metrics.DatabaseGauges) -> None:
        self.gauges = gauges

    async def get(self) -> None:
        # Shared and rate-limited: scrapers cannot add load to the database.
        counts = await self.gauges.get()
        text, content_type = metrics.render(counts)
        self.set_header("Content-Type", content_type)
        self.finish(text)


class OpenAPIHandler(JsonHandler):
    open_without_key = True

    def get(self) -> None:
        self.set_header("Content-Type", "application/yaml; charset=UTF-8")
        self.finish(OPENAPI.read_bytes())
