"""Everything loraship asks of the Hugging Face Hub: the only package that imports huggingface_hub's client.

Callers use one object, :class:`~loraship.hub.client.Hub` (``from loraship.hub import Hub``), made of
a part per concern, each in its own module; a new Hub call goes in the module of its concern:

- :mod:`.read`: reads that download no file (the token's account, a repo pinned to a commit as
  ``RepoState``, file sizes, a safetensors header, the head, an earlier ``Publication``);
- :mod:`.download`: files into the Hugging Face cache or a folder;
- :mod:`.publish`: writes to the output repo (create, pre-upload, the one commit, the tag);
- :mod:`.discussions`: comments on a repo's discussions;
- :mod:`.jobs`: Hugging Face Jobs;
- :mod:`.base`: what they share: the token (``hub_token``), the endpoint, one ``HfApi``, and
  ``_errors``, which every call wraps;
- :mod:`.errors`: huggingface_hub's errors as loraship messages (imports no other module here).

A new concern gets a module with a ``HubBase`` subclass, added to ``Hub``'s bases in
:mod:`.client`; the modules import :mod:`.base` (and :mod:`.read` for its types), never
:mod:`.client` or each other in a circle.
"""

from loraship.hub.client import Hub, hub_token

__all__ = ["Hub", "hub_token"]
