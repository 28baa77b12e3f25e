"""Everything loraship asks of GitHub, through PyGithub (the only module that imports it).

Commit statuses and releases for the Action; workflow and repository dispatches for the bot.
Errors become :class:`~loraship.errors.GitHubError` messages that say what to do; the token never
appears in them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loraship.errors import GitHubError

DEFAULT_API_URL = "https://api.github.com"
STATUS_CONTEXT = "loraship"
REPORT_ASSET = "loraship-report.json"


@dataclass(frozen=True)
class ReleaseInfo:
    url: str
    created: bool


class GitHub:
    """One GitHub repository, through PyGithub.

    Args:
        token: A token allowed to write statuses, releases (``contents: write``) or dispatches.
        repository: ``owner/name``.
        api_url: The REST API's URL (``GITHUB_API_URL`` on GitHub Enterprise Server).
    """

    def __init__(self, token: str, repository: str, *, api_url: str | None = None) -> None:
        from github import Auth, Github

        self.repository = repository
        self.api_url = (api_url or os.environ.get("GITHUB_API_URL") or DEFAULT_API_URL).rstrip("/")
        # loraship makes a handful of calls per run: no throttling between them.
        self._gh = Github(base_url=self.api_url, auth=Auth.Token(token), seconds_between_requests=None,
                          seconds_between_writes=None)  # fmt: skip
        self._repo: Any = None

    def repo(self) -> Any:
        if self._repo is None:
            with self._errors(f"read the repository {self.repository}"):
                self._repo = self._gh.get_repo(self.repository)
        return self._repo

    def set_status(
        self, sha: str, state: Literal["success", "failure", "pending", "error"], description: str, url: str | None
    ) -> None:
        """A commit status (context ``loraship``) on ``sha``."""
        repo = self.repo()
        with self._errors(f"set the commit status of {sha[:12]}"):
            commit = repo.get_commit(sha)
            kwargs: dict[str, Any] = {"state": state, "description": description[:140], "context": STATUS_CONTEXT}
            if url:
                kwargs["target_url"] = url
            commit.create_status(**kwargs)

    def release(self, tag: str, title: str, body: str, report: Path | None) -> ReleaseInfo:
        """Create the release of ``tag`` (or update it) with ``body``, and attach the report."""
        from github import GithubException

        repo = self.repo()
        with self._errors(f"create or update the release {tag}"):
            try:
                release = repo.get_release(tag)
                created = False
                release.update_release(name=title, message=body)
            except GithubException as e:
                if e.status != 404:
                    raise
                release = repo.create_git_release(tag, title, body)
                created = True
            if report is not None:
                for asset in release.get_assets():
                    if asset.name == REPORT_ASSET:
                        asset.delete_asset()
                release.upload_asset(str(report), name=REPORT_ASSET, content_type="application/json")
        return ReleaseInfo(url=str(release.html_url), created=created)

    def dispatch_workflow(self, workflow: str, ref: str, inputs: Mapping[str, str]) -> None:
        """Start ``workflow`` (a file name such as ``merge.yml``) on ``ref`` with ``inputs``."""
        repo = self.repo()
        with self._errors(f"dispatch the workflow {workflow}"):
            if not repo.get_workflow(workflow).create_dispatch(ref, dict(inputs)):
                raise GitHubError(
                    f"GitHub refused to dispatch the workflow `{workflow}` of `{self.repository}` on `{ref}`.",
                    fix="Check that the workflow has a `workflow_dispatch` trigger with these inputs, and that the "
                    "token may run workflows (actions: write).",
                )

    def dispatch_event(self, event_type: str, payload: Mapping[str, Any]) -> None:
        """A ``repository_dispatch`` event that workflows can listen to."""
        repo = self.repo()
        with self._errors(f"send the repository_dispatch event {event_type}"):
            repo.create_repository_dispatch(event_type, dict(payload))

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        import requests
        from github import BadCredentialsException, GithubException, UnknownObjectException

        try:
            yield
        except GitHubError:
            raise
        except BadCredentialsException as e:
            raise GitHubError(
                f"GitHub rejected the token while trying to {action} (401 Bad credentials).",
                fix="Pass `github-token: ${{ secrets.GITHUB_TOKEN }}` (or a token that is still valid).",
            ) from e
        except UnknownObjectException as e:
            raise GitHubError(
                f"GitHub answered 404 while trying to {action} of `{self.repository}`.",
                fix="Check the repository name and that the token can see it.",
            ) from e
        except (requests.RequestException, ConnectionError, TimeoutError) as e:
            raise GitHubError(
                f"Cannot reach GitHub at {self.api_url} to {action}: {type(e).__name__}.",
                fix="Check the network (and GITHUB_API_URL), then run again.",
                transient=True,
            ) from e
        except json.JSONDecodeError as e:
            raise GitHubError(
                f"GitHub sent a reply that is not JSON while trying to {action}.",
                fix="Try again in a while; if it persists, check https://www.githubstatus.com.",
                transient=True,
            ) from e
        except GithubException as e:
            if e.status == 403:
                raise GitHubError(
                    f"The GitHub token may not {action} (403 Forbidden).",
                    fix="Give the workflow the permissions it needs, e.g. `permissions: {contents: write, statuses: "
                    "write}` for releases and statuses, `actions: write` for workflow dispatches.",
                ) from e
            raise GitHubError(
                f"GitHub answered {e.status} while trying to {action}.",
                fix="Try again in a while; if it persists, check https://www.githubstatus.com.",
                transient=e.status >= 500 or e.status == 429,
            ) from e
