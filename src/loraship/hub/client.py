"""Everything loraship asks of the Hugging Face Hub, through huggingface_hub (the only package that
calls it): :class:`Hub`, one object made of a part per concern (see :mod:`loraship.hub`). Client
errors become :class:`~loraship.errors.HubError` messages that name the repo and say what to do;
tokens never appear in them.

The names callers use are re-exported here, from the modules that define them.
"""

from __future__ import annotations

from loraship.hub.base import DEFAULT_ENDPOINT, HubBase, hub_token
from loraship.hub.discussions import Discussions
from loraship.hub.download import Downloads
from loraship.hub.errors import CommitConflict
from loraship.hub.jobs import Jobs
from loraship.hub.publish import PreUpload, Publishing, file_identity
from loraship.hub.read import Identity, Publication, Reads, RepoState

__all__ = [
    "DEFAULT_ENDPOINT",
    "CommitConflict",
    "Hub",
    "HubBase",
    "Identity",
    "PreUpload",
    "Publication",
    "RepoState",
    "file_identity",
    "hub_token",
]


class Hub(Publishing, Reads, Downloads, Discussions, Jobs):
    """The Hugging Face Hub, through huggingface_hub's own client: reads (:class:`~.read.Reads`),
    downloads (:class:`~.download.Downloads`), the output repo's writes (:class:`~.publish.Publishing`,
    which builds on the reads, hence first), discussions (:class:`~.discussions.Discussions`) and Jobs
    (:class:`~.jobs.Jobs`), sharing one ``HfApi`` and the error translation (:class:`~.base.HubBase`).

    Args:
        token: The token; when None, huggingface_hub's own lookup (``HF_TOKEN``, else the token
            ``hf auth login`` stored). Never logged.
        endpoint: The Hub's URL (``HF_ENDPOINT`` when None, else https://huggingface.co).
    """
