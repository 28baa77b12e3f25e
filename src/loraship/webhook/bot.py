"""The bot: accepted triggers go into the durable queue; worker threads run them with the executor,
retry transient failures with backoff, and report on the adapter repo's Hub discussion."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from loraship.errors import LorashipError
from loraship.spec import MergeJob
from loraship.webhook.config import BotConfig
from loraship.webhook.executors import Executor, failure_comment
from loraship.webhook.payload import Trigger
from loraship.webhook.queue import Job, JobQueue

log = logging.getLogger("loraship.bot")


class Bot:
    """Accepts triggers and works them off.

    Args:
        config: bot.yaml.
        queue: The durable queue.
        executor: Where merges run.
        hub: For comments on the adapter repos (None: no comments).
    """

    def __init__(self, config: BotConfig, queue: JobQueue, executor: Executor, hub: Any | None) -> None:
        self.config = config
        self.queue = queue
        self.executor = executor
        self.hub = hub
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def accept(self, triggers: list[Trigger]) -> list[dict[str, Any]]:
        """Enqueue the triggers' jobs (a trigger already queued keeps its job); returns their ids."""
        accepted = []
        for trigger in triggers:
            rule = self.config.watch[trigger.rule]
            job = rule.merge_job(trigger.sha, tag=trigger.name if trigger.kind == "tag" else None)
            job_id, created = self.queue.enqueue(trigger.key, repo=trigger.repo, ref=trigger.ref, sha=trigger.sha,
                                                 rule=trigger.rule, job=job.model_dump(mode="json"))  # fmt: skip
            accepted.append({"id": job_id, "duplicate": not created})
            if created:
                log.info("queued job %s: %s %s at %s", job_id, trigger.repo, trigger.ref, trigger.sha[:12])
        self._wake.set()
        return accepted

    def start(self) -> None:
        recovered = self.queue.recover()
        if recovered:
            log.info("picked up %d job(s) that were running when the bot stopped", recovered)
        for i in range(self.config.executor.concurrency):
            thread = threading.Thread(target=self._work, name=f"loraship-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    def _work(self) -> None:
        while not self._stop.is_set():
            job = self.queue.claim()
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self.process(job)

    def process(self, job: Job) -> None:
        """Run one claimed job to its next state."""
        log.info("running job %s (attempt %d): %s at %s", job.id, job.attempts, job.repo, job.sha[:12])
        try:
            outcome = self.executor.run(job, MergeJob.model_validate(job.job))
        except LorashipError as error:
            retry = self.config.retry
            if error.transient and job.attempts < retry.attempts:
                delay = retry.backoff_seconds * 2 ** (job.attempts - 1)
                log.warning("job %s failed (transient), retrying in %.0f s: %s", job.id, delay, error.message)
                self.queue.retry_later(job.id, delay, str(error))
                return
            log.warning("job %s failed: %s", job.id, error.message)
            self._comment(job, failure_comment(job, error))
            self.queue.finish(job.id, "failed", error=str(error))
            return
        except Exception as error:  # a bug: record it, keep the bot alive
            log.exception("job %s crashed", job.id)
            self.queue.finish(job.id, "failed", error=f"internal error: {type(error).__name__}: {error}")
            return
        # Report first, then record the job as done: whoever sees the final state (an API poller,
        # a test) also sees the comment. A crash in between reruns the job, which finds the
        # output already published and does not comment twice.
        if outcome.comment:
            self._comment(job, outcome.comment)
        self.queue.finish(job.id, outcome.state, result=outcome.result)
        log.info("job %s %s", job.id, outcome.state)

    def _comment(self, job: Job, body: str) -> None:
        if self.hub is None:
            return
        try:
            url = self.hub.comment(job.repo, self.config.discussion_title, body)
            log.info("reported job %s on %s", job.id, url)
        except LorashipError as error:  # reporting must not fail the job
            log.warning("could not comment on %s: %s", job.repo, error.message)


def workdir_for(config: BotConfig) -> Path:
    return Path(config.executor.workdir or Path(config.state).with_suffix(".work"))
