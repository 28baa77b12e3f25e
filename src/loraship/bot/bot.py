"""The bot: accepted triggers go into the durable queue; worker threads run them with the executor,
retry transient failures with backoff, and report on the adapter repo's Hub discussion."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loraship.bot.config import BotConfig
from loraship.bot.executors import Executor, failure_comment, internal_error_comment
from loraship.bot.payload import Trigger
from loraship.bot.queue import Job, JobQueue, State
from loraship.errors import LorashipError
from loraship.run.job import MergeJob

log = logging.getLogger("loraship.bot")


class JobRefused(ValueError):
    """A trigger that makes no valid merge job (the delivery is answered 400; nothing is queued)."""


COMMENT_ATTEMPTS = 3  # a report is retried this often (backoff as for jobs) before the bot gives up on it
STUCK_AFTER = 1.5  # a job running this many times the executor's timeout is stuck


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
        self._busy: dict[str, tuple[str, float]] = {}  # worker name -> (job id, since)

    def accept(self, triggers: list[Trigger]) -> list[dict[str, Any]]:
        """Enqueue the triggers' jobs (a trigger already queued keeps its job); returns their ids.

        Raises:
            JobRefused: A trigger makes no valid merge job; then none of the triggers is enqueued.
        """
        jobs = [(trigger, self._merge_job(trigger)) for trigger in triggers]  # all valid before any is queued
        accepted = []
        for trigger, job in jobs:
            job_id, created = self.queue.enqueue(trigger.key, repo=trigger.repo, ref=trigger.ref, sha=trigger.sha,
                                                 rule=trigger.rule, job=job)  # fmt: skip
            accepted.append({"id": job_id, "duplicate": not created})
            if created:
                log.info("queued job %s: %s %s at %s", job_id, trigger.repo, trigger.ref, trigger.sha[:12])
        self._wake.set()
        return accepted

    def _merge_job(self, trigger: Trigger) -> dict[str, Any]:
        rule = self.config.watch[trigger.rule]
        try:
            job = rule.merge_job(trigger.sha, tag=trigger.name if trigger.kind == "tag" else None)
            return job.model_dump(mode="json")
        except (ValueError, OSError) as error:  # pydantic's ValidationError is a ValueError
            if isinstance(error, ValidationError):
                first = error.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "(job)"
                problem = f"`{where}`: {first['msg']}"
            else:
                problem = f"{type(error).__name__}: {error}"
            raise JobRefused(
                f"`{trigger.ref}` at `{trigger.sha}` makes no valid merge job for watch entry {trigger.rule + 1}"
                f" ({problem})"
            ) from error

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

    def health(self) -> list[str]:
        """What is wrong with the workers: dead threads, jobs running past the executor's timeout."""
        problems = [f"worker {t.name} has stopped" for t in self._threads if not t.is_alive()]
        limit = self.config.executor.timeout_minutes * 60 * STUCK_AFTER
        now = time.time()
        for name, (job_id, since) in sorted(self._busy.items()):
            if now - since > limit:
                problems.append(f"worker {name} has run job {job_id} for {(now - since) / 60:.0f} min")
        return problems

    def _work(self) -> None:
        name = threading.current_thread().name
        while not self._stop.is_set():
            try:
                job = self.queue.claim()
            except Exception:  # the queue's disk: keep trying, /healthz shows the log's reason by the job states
                log.exception("could not read the job queue")
                self._stop.wait(5.0)
                continue
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self._busy[name] = (job.id, time.time())
            try:
                self.process(job)
            except Exception as error:  # process records failures itself: this is the last line
                log.exception("job %s crashed the worker", job.id)
                self._record(job, "failed", error=f"internal error: {type(error).__name__}")
            finally:
                self._busy.pop(name, None)

    def process(self, job: Job) -> None:
        """Run one claimed job to its next state; every failure ends recorded on the job."""
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
            self._record(job, "failed", error=str(error))
            return
        except Exception as error:  # a bug: the traceback stays in the log, the repo gets the short story
            log.exception("job %s crashed", job.id)
            self._comment(job, internal_error_comment(job, error))
            self._record(job, "failed", error=f"internal error: {type(error).__name__}: {error}")
            return
        comment = outcome.comment
        if comment is None and outcome.state == "skipped" and job.attempts > 1 and outcome.recovered_comment:
            # An earlier attempt published and was stopped before it reported: report it now, once.
            comment = outcome.recovered_comment
        # Report first, then record the job as done: whoever sees the final state (an API poller,
        # a test) also sees the comment. The queue remembers the report, so a crash in between
        # does not comment twice.
        result = dict(outcome.result)
        if comment and not self.queue.reported(job.id):
            problem = self._comment(job, comment)
            if problem is None:
                self.queue.mark_reported(job.id)
            else:
                result["comment_error"] = problem
        self._record(job, outcome.state, result=result)
        log.info("job %s %s", job.id, outcome.state)

    def _record(
        self, job: Job, state: State, *, result: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        try:
            self.queue.finish(job.id, state, result=result, error=error)
        except Exception:  # the disk: the job stays `running`, /healthz and a restart take it from there
            log.exception("could not record job %s as %s", job.id, state)

    def _comment(self, job: Job, body: str) -> str | None:
        """Comment on the adapter repo, retrying transient failures; returns what went wrong, if anything."""
        if self.hub is None:
            return None
        attempts = COMMENT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                url = self.hub.comment(job.repo, self.config.discussion_title, body)
                log.info("reported job %s on %s", job.id, url)
                return None
            except LorashipError as error:  # reporting must not fail the job
                problem = error.message
                if not error.transient or attempt == attempts:
                    break
            except Exception as error:
                log.exception("commenting on %s crashed", job.repo)
                problem = f"internal error: {type(error).__name__}"
                break
            self._stop.wait(min(60.0, self.config.retry.backoff_seconds * 2 ** (attempt - 1)))
        log.warning("could not comment on %s: %s", job.repo, problem)
        return problem


def workdir_for(config: BotConfig) -> Path:
    return Path(config.executor.workdir or Path(config.state).with_suffix(".work"))
