"""UniLoRA (``peft_type: UNILORA``): every entry of every layer's LoRA factors is one shared parameter, scaled.

PEFT 0.21: ``tuners/unilora/layer.py`` (``UniLoraLayer.update_layer``, ``update_scaling``,
``Linear._get_lora_matrices``, ``Linear.get_delta_weight``, ``Linear.merge``), ``tuners/unilora/model.py``
(``UniLoraModel.inject_adapter``, ``_assign_unilora_indices_and_scales``, ``generate_index``,
``_get_adapter_state_dict``) and ``tuners/unilora/config.py`` (``UniLoraConfig``: ``r = 4``, ``theta_d_length``,
``proj_seed``, ``save_indices``).

The trained vector ``base_model.unilora_theta_d (L)`` is kept once for the model and reaches each module as a shared
tensor. With ``save_indices`` PEFT also saves per module ``unilora_indices_A (r, in)``, ``unilora_indices_B (out, r)``
(places in theta_d) and ``unilora_scales_A``/``_B`` (``1/√count`` of each place). ``_get_lora_matrices``: ``A =
theta_d[indices_A] * scales_A``, ``B = theta_d[indices_B] * scales_B``; ``Δ = B @ A`` (transposed for a Conv1D), added
in place to W. dtypes: after loading PEFT holds theta_d and the scales in fp32 (the saved values exactly), so the delta
is fp32 and the add rounds once to W's dtype.

Without ``save_indices`` the adapter holds only theta_d: which layers it changes, and the order in which PEFT deals
the indices out to them (``numpy.random.default_rng(proj_seed)`` over every targeted layer of the model), come from
matching ``target_modules`` against the model, which is not in the adapter's tensors: refused (:meth:`refusal`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

_THETA = "base_model.unilora_theta_d"
_OWN = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


class UniLoRA(Method):
    peft_type = "UNILORA"
    name = "UniLoRA"
    roles = _OWN
    shared = ("unilora_theta_d",)
    fields: ClassVar[dict[str, tuple[str, Callable[[Any], bool]]]] = {
        "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
        "theta_d_length": ("a whole number from 1", lambda v: _is_whole(v, 1)),
        "save_indices": ("true or false", lambda v: isinstance(v, bool)),
        "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    }

    def refusal(self, config: Mapping[str, Any]) -> str | None:
        if config.get("save_indices", False):
            return None
        return (
            "it was saved without its indices (save_indices = false), so it holds only the shared theta_d; which "
            "layers it changes, and how PEFT deals the places in theta_d out to them (in the model's order, from "
            "proj_seed), depend on matching target_modules against the model, which loraship does not do for UniLoRA"
        )

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if not {*_OWN, _THETA} <= set(tensors):
            raise incomplete(folder, name, set(tensors), self.name)
        if config.get("r") is None and "r" in config:
            raise AdapterError(
                f"`{folder}` sets `r` to null, but PEFT's UniLoraConfig needs a value there to merge.",
                fix="Restore `r` as PEFT saved it with these weights, or save the adapter again with PEFT.",
            )
        (length,) = tensors[_THETA].shape if len(tensors[_THETA].shape) == 1 else (-1,)
        settings = (("r", int(config.get("r", 4))), ("theta_d_length", int(config.get("theta_d_length", length))))
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if len(shape) != 2:
            return Unsupported(
                f"UniLoRA on a {len(shape)}-D weight is not merged (PEFT's UniLoRA adapts only Linear and Conv1D "
                "layers)"
            )
        out_features, in_features = (shape[1], shape[0]) if fan_in_fan_out else shape
        r = m.setting("r")
        expected = {
            _THETA: (m.setting("theta_d_length"),),
            "unilora_indices_A": (r, in_features),
            "unilora_scales_A": (r, in_features),
            "unilora_indices_B": (out_features, r),
            "unilora_scales_B": (out_features, r),
        }
        for role, wanted in expected.items():
            if m.shape(role) != wanted:
                return (
                    f"the adapter's {role} is {list(m.shape(role))}, while PEFT builds it {list(wanted)} for a layer "
                    f"of {out_features} outputs and {in_features} inputs (r = {r}, theta_d_length = "
                    f"{m.setting('theta_d_length')})"
                )
        return None

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        theta = adapter_float(tensors[_THETA])
        a = theta[tensors["unilora_indices_A"].to(torch.long)] * adapter_float(tensors["unilora_scales_A"])
        b = theta[tensors["unilora_indices_B"].to(torch.long)] * adapter_float(tensors["unilora_scales_B"])
        delta = b @ a
        weight += delta.T if fan_in_fan_out else delta
        return weight

    def describe(self, m: MethodModule) -> str:
        return f"UniLoRA r={m.setting('r')} over theta_d of {m.setting('theta_d_length')}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return ", ".join(f"{key} = {span([m.setting(key) for m in modules])}" for key in ("r", "theta_d_length"))


METHOD = UniLoRA()
