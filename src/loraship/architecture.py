"""What the checkpoint's headers cannot tell: which modules are the embeddings, and are they tied.

Builds the model class on PyTorch's ``meta`` device (no memory, no weights) from the base's
config.json and asks transformers. Importing transformers costs seconds, so the merge only calls
this when the adapter touches embeddings or modules the checkpoint does not store.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraship.adapter import AdapterSpec
from loraship.plan import ArchInfo, NameResolver


def needs_architecture(config: Mapping[str, Any], adapter: AdapterSpec, resolver: NameResolver) -> bool:
    """Whether planning this merge needs :func:`inspect_architecture`."""
    if adapter.replacements or adapter.token_updates:
        return True
    for module in adapter.lora_modules:
        if module.layer == "embedding" or module.param != "weight":
            return True
        if resolver.resolve(module.module, module.param) is None:
            return True
    return False


def inspect_architecture(folder: Path, adapter: AdapterSpec) -> tuple[ArchInfo, str | None]:
    """The embedding modules and tying of the model class the adapter was trained on.

    Returns:
        The information, and a note when it could not be obtained (the plan then refuses to guess).
    """
    try:
        import torch
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        names = [adapter.base_model_class, *(getattr(config, "architectures", None) or [])]
        model_cls = next((getattr(transformers, n) for n in names if n and hasattr(transformers, n)), None)
        if model_cls is None:
            return ArchInfo(), f"could not find the model class {names[0] or '(none named)'} in transformers"
        with torch.device("meta"):
            model = model_cls(config)
    except Exception as e:  # any failure here only means less information; the plan stays safe
        return ArchInfo(), f"could not build the model class to find its embeddings ({type(e).__name__}: {e})"
    module_names = {id(m): n for n, m in model.named_modules()}
    inp = model.get_input_embeddings()
    try:
        out = model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        out = None
    in_name = module_names.get(id(inp)) if inp is not None else None
    out_name = module_names.get(id(out)) if out is not None else None
    in_w = getattr(inp, "weight", None)
    out_w = getattr(out, "weight", None)
    tied = in_w is not None and out_w is not None and in_w is out_w
    transposed = frozenset(n for n, m in model.named_modules() if getattr(m, "is_transposed", False))
    info = ArchInfo(input_embedding=in_name, output_embedding=out_name, tied=tied, transposed_experts=transposed)
    return info, None
