"""The bot's HTTP side (FastAPI): ``POST /webhook``, ``GET /jobs``, ``GET /jobs/{id}``, ``GET /healthz``.

A delivery is authenticated (``X-Webhook-Secret``, compared in constant time: missing 401, wrong
403), size-limited (413), parsed (400 with the reason for anything that is not a Hub payload),
filtered (200 ``ignored`` with why), and its merges enqueued: 202 with the job ids, at once — the
Hub retries slow or failing deliveries and suspends webhooks that keep failing. Bad input never
gets a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from loraship import __version__
from loraship.bot.bot import Bot, JobRefused
from loraship.bot.config import BotConfig
from loraship.bot.payload import BadPayload, field_name, find_triggers, parse_body
from loraship.errors import ConfigError


def create_app(bot: Bot, secret: str) -> FastAPI:
    """The FastAPI app for ``bot``; ``secret`` is the webhook secret the Hub sends."""
    app = FastAPI(title="loraship bot", version=__version__)
    app.middleware("http")(_one_request_per_connection)
    started = time.time()

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        given = request.headers.get("x-webhook-secret")
        if given is None:
            return _error(401, "missing X-Webhook-Secret header")
        if not hmac.compare_digest(given.encode(), secret.encode()):
            return _error(403, "wrong webhook secret")
        limit = bot.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not (declared.isascii() and declared.isdigit()) or int(declared) > limit):
            return _error(413, f"body larger than {limit} bytes")
        try:
            body = await asyncio.wait_for(_read_body(request, limit), bot.config.read_timeout_seconds)
        except asyncio.TimeoutError:
            return _error(408, f"the body did not arrive within {bot.config.read_timeout_seconds:g} s")
        if body is None:
            return _error(413, f"body larger than {limit} bytes")
        try:
            data = parse_body(body)
            triggers, ignored = find_triggers(data, bot.config)
        except ValidationError as e:
            first = e.errors()[0]
            return _error(400, f"not a Hub webhook payload: `{field_name(first['loc'])}`: {first['msg']}")
        except BadPayload as e:
            return _error(400, f"not a Hub webhook payload: {e}" if e.field else str(e))
        if ignored is not None:
            return JSONResponse({"status": "ignored", "reason": ignored}, status_code=200)
        try:
            jobs = bot.accept(triggers)
        except JobRefused as e:
            return _error(400, str(e))
        return JSONResponse({"status": "accepted", "jobs": jobs}, status_code=202)

    def denied(request: Request) -> JSONResponse | None:
        """/jobs names repos (private ones too) and failures: only for who holds the webhook secret."""
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            return _error(401, "/jobs needs `Authorization: Bearer <the webhook secret>`")
        if not hmac.compare_digest(given.removeprefix("Bearer ").encode(), secret.encode()):
            return _error(403, "wrong bearer token (use the webhook secret)")
        return None

    @app.get("/jobs", response_model=None)
    def jobs(request: Request) -> dict[str, Any] | JSONResponse:
        refused = denied(request)
        if refused is not None:
            return refused
        return {"jobs": [job.to_json() for job in bot.queue.list()]}

    @app.get("/jobs/{job_id}")
    def job(job_id: str, request: Request) -> JSONResponse:
        refused = denied(request)
        if refused is not None:
            return refused
        found = bot.queue.get(job_id)
        if found is None:
            return _error(404, f"no job {job_id}")
        return JSONResponse(found.to_json())

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        problems = bot.health()
        data = {
            "status": "unhealthy" if problems else "ok",
            "version": __version__,
            "uptime_s": round(time.time() - started, 1),
            "jobs": bot.queue.counts(),
            "problems": problems,
        }
        return JSONResponse(data, status_code=503 if problems else 200)

    return app


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None once it passes ``limit`` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            return None
    return bytes(body)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _one_request_per_connection(request: Request, call_next: Any) -> Any:
    response = await call_next(request)
    response.headers["connection"] = "close"
    return response


def webhook_secret(env: dict[str, str] | None = None) -> str:
    """The webhook secret, from ``WEBHOOK_SECRET``.

    Raises:
        ConfigError: It is not set: the bot refuses to accept unauthenticated deliveries.
    """
    secret = (env if env is not None else dict(os.environ)).get("WEBHOOK_SECRET", "")
    if not secret:
        raise ConfigError(
            "WEBHOOK_SECRET is not set: the bot does not accept unauthenticated webhook deliveries.",
            fix="Set WEBHOOK_SECRET to the secret of the webhook in your Hub settings "
            "(https://huggingface.co/settings/webhooks).",
        )
    return secret


def server_config(app: FastAPI, config: BotConfig, *, host: str, port: int) -> Any:
    """uvicorn's settings for the bot: bounded connections, one request per connection, and no
    connection held by a client that does not finish sending its request (see ``_Deadlines``)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="info", limit_concurrency=config.max_connections,
                          timeout_keep_alive=1, h11_max_incomplete_event_size=64 * 1024,
                          http=_deadline_protocol(config.read_timeout_seconds))  # fmt: skip


def _deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline for the request headers: uvicorn itself waits forever
    for a request that never completes, so idle half-open connections would exhaust descriptors."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _Deadlines(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline = self.loop.call_later(seconds, self._too_slow)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self._deadline is not None:  # the headers are in
                self._deadline.cancel()
                self._deadline = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _too_slow(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return _Deadlines


def serve(config_path: Path, *, host: str, port: int) -> None:
    """``loraship serve``: load bot.yaml, start the workers, serve HTTP until stopped."""
    import logging

    import uvicorn

    from loraship.bot.bot import workdir_for
    from loraship.bot.config import load_bot_config
    from loraship.bot.executors import make_executor
    from loraship.bot.queue import JobQueue
    from loraship.hub import Hub

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_bot_config(config_path)
    secret = webhook_secret()
    env = dict(os.environ)
    signed_in = Hub()  # HF_TOKEN, or the token `hf auth login` stored
    hub = signed_in if signed_in.token else None
    executor = make_executor(config, hub=hub, env=env, workdir=workdir_for(config))
    queue = JobQueue(Path(config.state))
    bot = Bot(config, queue, executor, hub)
    bot.start()
    try:
        uvicorn.Server(server_config(create_app(bot, secret), config, host=host, port=port)).run()
    finally:
        bot.stop()
        queue.close()
