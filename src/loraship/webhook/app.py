"""The bot's HTTP side (FastAPI): ``POST /webhook``, ``GET /jobs``, ``GET /jobs/{id}``, ``GET /healthz``.

A delivery is authenticated (``X-Webhook-Secret``, compared in constant time: missing 401, wrong
403), size-limited (413), parsed (400 with the reason for anything that is not a Hub payload),
filtered (200 ``ignored`` with why), and its merges enqueued: 202 with the job ids, at once — the
Hub retries slow or failing deliveries and suspends webhooks that keep failing. Bad input never
gets a 500.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from loraship import __version__
from loraship.errors import ConfigError
from loraship.webhook.bot import Bot
from loraship.webhook.payload import find_triggers


def create_app(bot: Bot, secret: str) -> FastAPI:
    """The FastAPI app for ``bot``; ``secret`` is the webhook secret the Hub sends."""
    app = FastAPI(title="loraship bot", version=__version__)
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
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return _error(413, f"body larger than {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                return _error(413, f"body larger than {limit} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"body is not JSON ({e})")
        if not isinstance(data, dict):
            return _error(400, "body is not a JSON object")
        try:
            triggers, ignored = find_triggers(data, bot.config)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(body)"
            return _error(400, f"not a Hub webhook payload: `{where}`: {first['msg']}")
        if ignored is not None:
            return JSONResponse({"status": "ignored", "reason": ignored}, status_code=200)
        jobs = bot.accept(triggers)
        return JSONResponse({"status": "accepted", "jobs": jobs}, status_code=202)

    @app.get("/jobs")
    def jobs() -> dict[str, Any]:
        return {"jobs": [job.to_json() for job in bot.queue.list()]}

    @app.get("/jobs/{job_id}")
    def job(job_id: str) -> JSONResponse:
        found = bot.queue.get(job_id)
        if found is None:
            return _error(404, f"no job {job_id}")
        return JSONResponse(found.to_json())

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "uptime_s": round(time.time() - started, 1),
                "jobs": bot.queue.counts()}  # fmt: skip

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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


def serve(config_path: Path, *, host: str, port: int) -> None:
    """``loraship serve``: load bot.yaml, start the workers, serve HTTP until stopped."""
    import logging

    import uvicorn

    from loraship.hub import Hub
    from loraship.webhook.bot import workdir_for
    from loraship.webhook.config import load_bot_config
    from loraship.webhook.executors import make_executor
    from loraship.webhook.queue import JobQueue

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_bot_config(config_path)
    secret = webhook_secret()
    env = dict(os.environ)
    hub = Hub() if env.get("HF_TOKEN") else None
    executor = make_executor(config, hub=hub, env=env, workdir=workdir_for(config))
    queue = JobQueue(Path(config.state))
    bot = Bot(config, queue, executor, hub)
    bot.start()
    try:
        uvicorn.run(create_app(bot, secret), host=host, port=port, log_level="info")
    finally:
        bot.stop()
        queue.close()
