"""SHiRA (``peft_type: SHIRA``): ``W' = W + S``, S sparse: the adapter's values at its saved positions.

PEFT 0.21: ``tuners/shira/layer.py`` (``ShiraLayer.update_layer``, ``Linear.merge``, ``Linear.get_delta_weight``),
``tuners/shira/model.py`` (``_create_new_module``: Linear layers only; ``_remap_adapter_state_dict_for_load``: the
saved ``shira_indices`` loaded as int32) and ``tuners/shira/config.py`` (``ShiraConfig``: ``r = 32``,
``mask_type = "random"``).

``shira_weight`` holds ``r * (in + out)`` values (fp32: PEFT upcasts a half-precision adapter on load; PEFT refuses an
``r`` for which that exceeds ``in * out``) and ``shira_indices`` their ``(row, column)`` places, ``(2, nnz)``. The mask
that chose them (``mask_type``, ``random_seed``) only matters when training starts: the places are saved, so nothing
is drawn again here. ``get_delta_weight`` is ``torch.sparse_coo_tensor(indices, shira_weight * scaling, (out, in))``
with ``scaling = 1.0`` (``set_scale`` changes it only at run time), and the merge adds it in place to W (one rounding
to W's dtype). These are reproduced with the same torch calls.

Every merge is checked against PEFT's own layers built on the meta device (:mod:`loraship.engine.oracle`), where
PEFT's ``ShiraLayer.update_layer`` cannot take the places of the mask's ones (``torch.where`` on a meta mask is
data-dependent): that check builds the layer without the mask and gives it ``r x (in + out)`` meta places
(``_meta_safe_layers``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError, IncompatibleError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

#: adapter_config.json fields SHiRA reads, with what PEFT's ShiraConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
}


class SHiRA(Method):
    peft_type = "SHIRA"
    name = "SHiRA"
    roles = ("shira_indices", "shira_weight")
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if set(tensors) != {"shira_indices", "shira_weight"}:
            raise incomplete(folder, name, set(tensors), self.name)
        indices, values = tuple(tensors["shira_indices"].shape), tuple(tensors["shira_weight"].shape)
        if len(values) != 1 or indices != (2, values[0]):
            raise AdapterError(
                f"`{folder}`: the SHiRA module `{name}` has shira_indices {list(indices)} and shira_weight "
                f"{list(values)}, but PEFT makes them (2, n) and (n) and cannot load them.",
                fix="The adapter file is not one PEFT saved: save the adapter again with PEFT.",
            )
        return MethodModule(self.peft_type, name, tuple(tensors.items()), (("r", int(config.get("r", 32))),))

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if fan_in_fan_out or len(shape) != 2:
            kind = "Conv1D layer (weights stored (in, out))" if fan_in_fan_out else f"{len(shape)}-D weight"
            return Unsupported(f"SHiRA on a {kind} is not merged (PEFT's SHiRA adapts only Linear layers)")
        (out_features, in_features), r = shape, m.setting("r")
        expected = r * (in_features + out_features)
        if expected > in_features * out_features:
            return (
                f"PEFT's SHiRA refuses r = {r} there: r x (in + out) = {expected} values, more than the weight's "
                f"{in_features * out_features}"
            )
        (saved,) = m.shape("shira_weight")
        if saved == expected:
            return None
        return (
            f"the adapter's shira_weight has {saved} values, not the r x (in + out) = {r} x ({in_features} + "
            f"{out_features}) = {expected} PEFT makes"
        )

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        indices = tensors["shira_indices"].to(torch.int)
        out_features, in_features = weight.shape
        if indices.numel() and (indices.min() < 0 or indices[0].max() >= out_features or
                                indices[1].max() >= in_features):  # fmt: skip
            raise IncompatibleError(
                f"The SHiRA module `{m.module}` has shira_indices outside its {out_features} x {in_features} weight.",
                fix="The adapter file does not belong to this base model: use the base it was trained on.",
            )
        delta_weight = torch.sparse_coo_tensor(
            indices, adapter_float(tensors["shira_weight"]) * 1.0, (out_features, in_features)
        )
        weight += delta_weight
        return weight

    def describe(self, m: MethodModule) -> str:
        (n,) = m.shape("shira_weight")
        return f"SHiRA {n} sparse values (r={m.setting('r')})"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return f"r = {span([m.setting('r') for m in modules])}"


METHOD = SHiRA()
