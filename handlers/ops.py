"""Endpoints for operators and tools: health, metrics, the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

from .base import JsonHandler

OPENAPI = Path(__file__).resolve().parent.parent / "openapi.yaml"


class HealthHandler(JsonHandler):
    async def get(self) -> None:
        store = self.services["store"]
        report: dict = {"database": "ok", "workers": 0}
        stuck: list[str] = []

        async def probe() -> tuple[int, list[str]]:
            await store.ping()
            return await store.live_workers(within=10)

        try:
            # One deadline for both calls: an outage answers in DB_TIMEOUT.
            report["workers"], stuck = await self.db(probe)
        except Exception:  # noqa: BLE001 - any failure here means unhealthy
            report["database"] = "unreachable"
        if stuck:
            report["stuck_workers"] = stuck
        healthy = report["database"] == "ok" and not stuck and (
            report["workers"] > 0 or not self.services["expect_workers"])
        report["status"] = "ok" if healthy else "unhealthy"
        self.send(200 if healthy else 503, report)


class MetricsHandler(JsonHandler):
    async def get(self) -> None:
        from service.runtime import metrics
        # Shared and rate-limited: scrapers cannot add load to the database.
        counts = await self.services["gauges"].get()
        text, content_type = metrics.render(counts)
        self.set_header("Content-Type", content_type)
        self.finish(text)


class OpenAPIHandler(JsonHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/yaml; charset=UTF-8")
        self.finish(OPENAPI.read_bytes())
