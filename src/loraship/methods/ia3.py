"""IA3 (``peft_type: IA3``): a learned vector that scales a layer's outputs, or its inputs.

PEFT 0.21: ``tuners/ia3/layer.py`` (``IA3Layer.update_layer``, ``Linear.merge``) and ``tuners/ia3/model.py``
(``_check_target_module_feedforward``). ``ia3_l`` is ``(out, 1)`` for most modules (scales W's rows) and
``(1, in)`` for those ``feedforward_modules`` matches (scales its columns: the layer's input); for a Conv1D
layer (weights stored (in, out)) PEFT transposes it. The merge is ``W' = (W * l).to(W.dtype)``: the
product in fp32 (W times the fp32 vector), rounded once. A module that is not feed-forward also scales
its bias: ``b' = (b * l.reshape(b.shape)).to(b.dtype)``. A feed-forward module's bias is left alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.methods.base import Method, MethodModule, Saved, Unsupported, incomplete

if TYPE_CHECKING:
    import torch


#: adapter_config.json fields IA3 reads, with what PEFT's IA3Config expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "feedforward_modules": ("a module name pattern or a list of names", lambda v: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(x, str) for x in v))),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
}  # fmt: skip


class IA3(Method):
    peft_type = "IA3"
    name = "IA3"
    kind = "multiplicative"
    roles = ("ia3_l",)
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if "ia3_l" not in tensors:
            raise incomplete(folder, name, set(tensors), self.name)
        return MethodModule(
            self.peft_type, name, tuple(tensors.items()), (("feedforward", _feedforward(config, name)),)
        )

    def params(self, m: MethodModule) -> tuple[tuple[str, bool], ...]:
        return (("weight", True),) if m.setting("feedforward") else (("weight", True), ("bias", False))

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        vector = m.shape("ia3_l")
        ff = m.setting("feedforward")
        if param == "bias":
            fits = len(shape) == 1 and vector == (shape[0], 1)
        elif len(shape) != 2:
            return Unsupported(
                f"IA3 on a {len(shape)}-D weight (a convolution) is not merged by loraship yet (it merges IA3 on "
                "Linear and Conv1D layers)"
            )
        else:
            out_f, in_f = (shape[1], shape[0]) if fan_in_fan_out else shape
            fits = vector == ((1, in_f) if ff else (out_f, 1))
        if fits:
            return None
        kind = "a feed-forward module's (1, in)" if ff else "an (out, 1)"
        return f"the adapter's ia3_l {list(vector)} is not {kind} vector for it"

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        vector = tensors["ia3_l"].float()
        if param == "bias":
            return torch.mul(weight, vector.reshape(weight.shape)).to(weight.dtype)
        scaling = vector.T if fan_in_fan_out else vector
        return torch.mul(weight, scaling).to(weight.dtype)

    def describe(self, m: MethodModule) -> str:
        return "IA3 " + ("× input columns (feed-forward)" if m.setting("feedforward") else "× output rows")

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        ff = sum(1 for m in modules if m.setting("feedforward"))
        return f"{len(modules) - ff} module(s) scaled on their outputs, {ff} feed-forward on their inputs"


def _feedforward(config: Mapping[str, Any], module: str) -> bool:
    """PEFT's ``_check_target_module_feedforward`` (the pattern was tried in bounded time before)."""
    wanted = config.get("feedforward_modules") or []
    if isinstance(wanted, str):
        return bool(re.fullmatch(wanted, module))
    return any(module.endswith(key) for key in wanted)


METHOD = IA3()
