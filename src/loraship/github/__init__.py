"""Everything loraship asks of GitHub: the only package that imports PyGithub."""

from loraship.github.client import GitHub

__all__ = ["GitHub"]
