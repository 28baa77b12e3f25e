"""loraship: merge LoRA adapters into their base model by streaming safetensors, verify, publish."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loraship")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
