"""A repo's discussions: the report loraship posts as a comment (:meth:`Discussions.comment`)."""

from __future__ import annotations

from loraship.hub.base import HubBase


class Discussions(HubBase):
    """The Hub's discussions (part of :class:`~loraship.hub.Hub`)."""

    def comment(self, repo_id: str, title: str, body: str) -> str:
        """Comment on the repo's discussion called ``title`` (opened if missing); returns its URL."""
        with self._errors("comment on", repo_id):
            for discussion in self.api.get_repo_discussions(repo_id, discussion_type="discussion"):
                if discussion.title == title and discussion.status == "open":
                    self.api.comment_discussion(repo_id, discussion.num, body)
                    return str(discussion.url)
            created = self.api.create_discussion(repo_id, title=title, description=body)
            return str(created.url)
