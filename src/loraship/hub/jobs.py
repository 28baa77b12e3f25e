"""Hugging Face Jobs: starting one (:meth:`Jobs.run_job`), the token passed in as a secret."""

from __future__ import annotations

from loraship.hub.base import HubBase


class Jobs(HubBase):
    """The Hub's Jobs (part of :class:`~loraship.hub.Hub`)."""

    def run_job(
        self, *, image: str, command: list[str], env: dict[str, str], flavor: str, timeout: str, namespace: str | None
    ) -> tuple[str, str]:
        """Start a Hugging Face Job (the token goes in as a secret); returns its id and URL."""
        with self._errors("start a Hugging Face Job"):
            job = self.api.run_job(image=image, command=command, env=env, secrets={"HF_TOKEN": self.token or ""},
                                   flavor=flavor, timeout=timeout, namespace=namespace)  # fmt: skip
        return str(job.id), str(job.url)
