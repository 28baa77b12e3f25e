"""What every part of :class:`~loraship.hub.Hub` shares: the token (:func:`hub_token`), the endpoint,
one ``HfApi``, and :meth:`HubBase._errors`, the error translation every Hub call goes through.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from loraship import __version__
from loraship.errors import HubError
from loraship.hub.errors import translate

DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_token() -> str | None:
    """huggingface_hub's own token lookup: a trusted-publishing exchange when ``HF_OIDC_RESOURCE``
    is set, else ``HF_TOKEN``, else the token ``hf auth login`` stored.

    Raises:
        HubError: Trusted publishing is asked for and the exchange fails (never a silent fallback).
    """
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError, OIDCError

    try:
        return get_token() or None
    except (OIDCError, HfHubHTTPError) as e:
        resource = os.environ.get("HF_OIDC_RESOURCE", "")
        reason = (getattr(e, "server_message", None) or str(e)).strip().splitlines()[0]
        raise HubError(
            f"Trusted publishing failed: the Hub did not exchange this job's OIDC token for a token scoped to "
            f"`{resource}` ({reason.strip().rstrip('.')}).",
            fix=f"On the Hub, add this GitHub repository and workflow as a trusted publisher of `{resource}` (its "
            "Settings, Trusted publishers: https://huggingface.co/docs/hub/trusted-publishers), and give the job "
            "`permissions: id-token: write`; or use an `hf-token` instead.",
        ) from e


class HubBase:
    """The Hugging Face Hub, through huggingface_hub's own client.

    Args:
        token: The token; when None, huggingface_hub's own lookup (``HF_TOKEN``, else the token
            ``hf auth login`` stored). Never logged.
        endpoint: The Hub's URL (``HF_ENDPOINT`` when None, else https://huggingface.co).
    """

    def __init__(self, *, token: str | None = None, endpoint: str | None = None) -> None:
        from huggingface_hub import HfApi

        self.token = token if token is not None else hub_token()
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, token=self.token or False, library_name="loraship",
                         library_version=__version__)  # fmt: skip

    def url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    @contextlib.contextmanager
    def _errors(self, action: str, repo_id: str | None = None, revision: str | None = None) -> Iterator[None]:
        """Hub client errors raised inside become HubErrors (see :func:`loraship.hub.errors.translate`)."""
        try:
            yield
        except HubError:
            raise
        except Exception as e:
            translated = translate(e, action, repo_id, revision, endpoint=self.endpoint, has_token=bool(self.token))
            if translated is None:
                raise
            raise translated from e
