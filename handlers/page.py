"""The web page at / and its files under /static/: plain files from
handlers/static (no build step), sent with a Content-Security-Policy that
allows nothing inline and nothing from elsewhere."""

from __future__ import annotations

from pathlib import Path

from tornado import web

from .base import dumps

STATIC = Path(__file__).resolve().parent / "static"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _secure(handler: web.RequestHandler) -> None:
    handler.set_header("Content-Security-Policy", CSP)
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("Referrer-Policy", "no-referrer")


class StaticHandler(web.StaticFileHandler):
    def set_default_headers(self) -> None:
        _secure(self)

    def get_content_type(self) -> str:
        ctype = super().get_content_type()
        return f"{ctype}; charset=UTF-8" if ctype.startswith("text/") else ctype

    def set_extra_headers(self, path: str) -> None:
        # Small files, changed with the code: revalidate rather than cache
        # stale ones (StaticFileHandler's ETag makes that a cheap 304).
        self.set_header("Cache-Control", "no-cache")

    def write_error(self, status_code: int, **kwargs) -> None:
        # Errors are JSON here too, as everywhere in the API.
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        if status_code == 405:
            self.set_header("Allow", "GET, HEAD")
        self.finish(dumps({"error": "not found" if status_code == 404
                           else self._reason.lower()}))


class PageHandler(StaticHandler):
    """/ is index.html."""

    async def get(self, path: str = "", include_body: bool = True) -> None:
        await super().get("index.html", include_body)

    async def head(self, path: str = "") -> None:
        await super().get("index.html", include_body=False)
