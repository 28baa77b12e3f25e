"""BEFT (``peft_type: BEFT``): bias tuning, ``b' = b + beft_bias``.

PEFT 0.21: ``tuners/beft/layer.py`` (``BeftLayer.__init__``: Linear layers only; ``update_layer``, ``Linear.merge``)
and ``tuners/beft/config.py`` (``BeftConfig``). ``beft_bias`` is ``(1, out)`` (fp32: PEFT upcasts a
half-precision adapter on load). The merge is ``bias.add_(beft_bias.squeeze())``: the fp32 sum rounded once to the
bias's dtype; the weight is left alone. PEFT adapts a layer without a bias too (its forward adds ``beft_bias`` to
the output) but refuses to merge it ("Base layer has no bias"), and so does loraship: there is no bias in the base
checkpoint to put the change in (the planner names the layer, as it does for any method's required parameter the
base layer lacks). The check of every plan against PEFT's own layers (:mod:`loraship.engine.oracle`) asks the
method which parameter its tensors change (:meth:`BEFT.params`: the bias).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete

if TYPE_CHECKING:
    import torch

#: adapter_config.json fields BEFT reads, with what PEFT's BeftConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
}


class BEFT(Method):
    peft_type = "BEFT"
    name = "BEFT"
    roles = ("beft_bias",)
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if set(tensors) != {"beft_bias"}:
            raise incomplete(folder, name, set(tensors), self.name)
        shape = tuple(tensors["beft_bias"].shape)
        if len(shape) != 2 or shape[0] != 1:
            raise AdapterError(
                f"`{folder}`: the BEFT module `{name}` has beft_bias {list(shape)}, but PEFT makes it (1, out) and "
                "cannot load it.",
                fix="The adapter file is not one PEFT saved: save the adapter again with PEFT.",
            )
        return MethodModule(self.peft_type, name, tuple(tensors.items()))

    def params(self, m: MethodModule) -> tuple[tuple[str, bool], ...]:
        return (("bias", True),)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if len(shape) != 1:
            return Unsupported(f"BEFT on a {len(shape)}-D bias is not merged (PEFT's BEFT adapts only Linear layers)")
        saved = m.shape("beft_bias")
        if saved[1] == shape[0]:
            return None
        return f"the adapter's beft_bias {list(saved)} needs a bias of {saved[1]} output features"

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        weight.add_(adapter_float(tensors["beft_bias"]).squeeze())
        return weight

    def describe(self, m: MethodModule) -> str:
        return "BEFT bias"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return f"{len(modules)} bias(es) tuned"


METHOD = BEFT()
