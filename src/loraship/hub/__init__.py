"""Everything loraship asks of the Hugging Face Hub: the only package that imports huggingface_hub's client."""

from loraship.hub.client import Hub, hub_token

__all__ = ["Hub", "hub_token"]
