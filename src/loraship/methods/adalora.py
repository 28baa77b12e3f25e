"""AdaLoRA (``peft_type: ADALORA``): ``W' = W + transpose(B @ (A * E), fan_in_fan_out) * scaling / (ranknum + 1e-5)``.

PEFT 0.21: ``tuners/adalora/layer.py`` (``AdaLoraLayer.update_layer``, ``SVDLinear.get_delta_weight``,
``SVDLinear.merge``, ``SVDConv2d.get_delta_weight``) and ``tuners/adalora/model.py``
(``resize_modules_by_rank_pattern``, ``resize_state_dict_by_rank_pattern``, ``_create_new_module``).

Per module PEFT saves ``lora_A (r, in)``, ``lora_E (r, 1)`` and ``lora_B (out, r)`` (no ``.weight``), where
``r`` is ``init_r`` or, after budget allocation, the rank kept: ``rank_pattern`` maps
``<module>.lora_E`` to a mask of ``init_r`` booleans and save keeps the True rows / columns only (a module
may keep none: empty tensors, whose delta is zero). ``ranknum`` is not saved: PEFT builds it as
``float(init_r)`` in a 1-element parameter, which ``_move_adapter_to_device_of_base_layer`` casts to the
base weight's dtype and ``cast_adapter_dtype`` back to fp32; on load a module the rank pattern names is
rebuilt with its kept rank (``update_layer`` again) and its old ``ranknum`` copied back, so the divisor
stays ``init_r`` (0 for a module that keeps no rank). That rebuild makes the new parameters in the base
weight's dtype before the saved tensors are copied in, so on a bf16 / fp16 base the saved fp32 tensors of
those modules are rounded to that dtype (then upcast to fp32 again); modules the pattern does not name
keep the saved values. ``scaling = lora_alpha if lora_alpha > 0 else float(r)``, with ``r`` the rank the
layer was (re)built with. The delta is fp32 and the in-place add ``W += delta`` rounds once to W's dtype.
On a Conv2d the delta is ``B @ (A * E) * scaling / (ranknum + 1e-5)`` reshaped to W (no transpose);
PEFT forces ``fan_in_fan_out`` to the layer's real layout (False on Linear, True on Conv1D).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, _is_number, incomplete, product, span

if TYPE_CHECKING:
    import torch

_ROLES = ("lora_A", "lora_B", "lora_E")


def _is_masks(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, list) and all(isinstance(b, bool) for b in x) for k, x in v.items()
    )


#: adapter_config.json fields AdaLoRA reads, with what PEFT's AdaLoraConfig expects (``r`` is ignored).
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "init_r": ("a whole number from 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "lora_alpha": ("a number", _is_number),
    "rank_pattern": ("a mapping of module names to lists of true/false (a mask over init_r)", _is_masks),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("false (AdaLoRA does not support DoRA)", lambda v: v is False),
}


def _pattern_module(key: str) -> str:
    """The module a ``rank_pattern`` key resizes, as ``resize_modules_by_rank_pattern`` finds it (the
    adapter is loaded as ``default``)."""
    parts = key.split(".")
    return ".".join(parts[:-2] if "default" in key else parts[:-1])


class AdaLoRA(Method):
    peft_type = "ADALORA"
    name = "AdaLoRA"
    roles = _ROLES
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if not set(_ROLES) <= set(tensors):
            raise incomplete(folder, name, set(tensors), self.name)
        a, b, e = (tuple(tensors[r].shape) for r in _ROLES)
        kept = a[0] if len(a) == 2 else -1
        if len(a) != 2 or len(b) != 2 or b[1] != kept or e != (kept, 1):
            raise AdapterError(
                f"`{folder}`: the AdaLoRA module `{name}` has lora_A {list(a)}, lora_B {list(b)} and lora_E "
                f"{list(e)}, which are not (r, in), (out, r) and (r, 1) for one rank r.",
                fix="The adapter file is damaged: save it again with PEFT.",
            )
        init_r = int(config.get("init_r", 12))
        alpha = config.get("lora_alpha", 8)
        masks = [mask for key, mask in dict(config.get("rank_pattern") or {}).items() if _pattern_module(key) == name]
        where = folder / "adapter_config.json"
        if len(masks) > 1:
            raise AdapterError(
                f"`{where}`: rank_pattern names the module `{name}` {len(masks)} times.",
                fix="Restore adapter_config.json as PEFT saved it with these weights (rank_pattern).",
            )
        resized = bool(masks)
        if resized and (len(masks[0]) != init_r or sum(masks[0]) != kept):
            raise AdapterError(
                f"`{where}`: rank_pattern keeps {sum(masks[0])} of {len(masks[0])} ranks of `{name}`, but its "
                f"tensors have rank {kept} and init_r is {init_r} (PEFT refuses to load it).",
                fix="Restore adapter_config.json as PEFT saved it with these weights (init_r, rank_pattern).",
            )
        if not resized and kept != init_r:
            raise AdapterError(
                f"`{folder}`: the AdaLoRA module `{name}` has rank {kept}, but init_r is {init_r} and rank_pattern "
                "does not name it (PEFT refuses to load it).",
                fix="Restore adapter_config.json as PEFT saved it with these weights (init_r, rank_pattern).",
            )
        built_r = kept if resized else init_r  # the r of PEFT's last update_layer for the module
        scaling = alpha if alpha > 0 else float(built_r)
        ranknum = float(init_r) if kept > 0 or not resized else 0.0
        settings = (
            ("r", kept), ("init_r", init_r), ("alpha", alpha), ("scaling", scaling), ("ranknum", ranknum),
            ("resized", resized),
        )  # fmt: skip
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        a, b = m.shape("lora_A"), m.shape("lora_B")
        if len(shape) not in (2, 4) or (len(shape) == 4 and fan_in_fan_out):
            return Unsupported(
                f"AdaLoRA on a {len(shape)}-D weight is not merged (PEFT's AdaLoRA wraps Linear, Conv1D and Conv2d "
                "layers only)"
            )
        if len(shape) == 4:
            fits = b[0] == shape[0] and a[1] == product(shape[1:])
        else:
            out_f, in_f = (shape[1], shape[0]) if fan_in_fan_out else shape
            fits = (b[0], a[1]) == (out_f, in_f)
        if fits:
            return None
        return f"the adapter's lora_B {list(b)} @ lora_A {list(a)} makes {[b[0], a[1]]}"

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        halves = (torch.float16, torch.bfloat16)
        held = torch.float32 if weight.dtype in halves or weight.dtype == torch.float32 else weight.dtype

        def as_held(t: torch.Tensor) -> torch.Tensor:
            if m.setting("resized"):  # rebuilt in W's dtype, the saved tensor copied in, then upcast
                t = t.to(weight.dtype)
            return t.to(held)

        lora_a, lora_b, lora_e = (as_held(tensors[r]) for r in _ROLES)
        ranknum = torch.tensor([m.setting("ranknum")], dtype=weight.dtype).to(held)
        scaling = m.setting("scaling")
        product_ = lora_b @ (lora_a * lora_e)
        if weight.dim() == 4:
            delta = (product_ * scaling / (ranknum + 1e-5)).reshape(weight.shape)
        else:
            delta = (product_.T if fan_in_fan_out else product_) * scaling / (ranknum + 1e-5)
        weight += delta
        return weight

    def describe(self, m: MethodModule) -> str:
        r, init_r = m.setting("r"), m.setting("init_r")
        if r == 0:
            return f"AdaLoRA r=0 of {init_r} (no change)"
        return f"AdaLoRA r={r} of {init_r} scale={m.setting('scaling'):g}/{m.setting('ranknum'):g}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        kept = [m.setting("r") for m in modules]
        init = [m.setting("init_r") for m in modules]
        alpha = [m.setting("alpha") for m in modules]
        return f"init_r = {span(init)}, rank kept = {span(kept)}, lora_alpha = {span(alpha)}"


METHOD = AdaLoRA()
