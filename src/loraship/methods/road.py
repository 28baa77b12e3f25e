"""RoAd (``peft_type: ROAD``): ``W' = R @ W`` and ``b' = R @ b``, R a 2-D rotation and scale of each pair of
output features.

PEFT 0.21: ``tuners/road/layer.py`` (``RoadLayer.update_layer``, ``Linear.merge``, ``_get_delta_weight``,
``_prepare_cols``, ``dispatch_default``: Linear layers only) and ``tuners/road/config.py`` (``RoadConfig``:
``variant`` road_1, road_2 or road_4; ``group_size``, even, default 64, must divide the layer's output features).

``road_theta`` and ``road_alpha`` hold ``out / 2`` (road_1), ``out`` (road_2) or ``2 * out`` (road_4) values (fp32:
PEFT upcasts a half-precision adapter on load). The outputs are split in groups of ``group_size``; in a group,
element ``i`` pairs with ``i + group_size / 2``. ``_prepare_cols`` makes ``alpha * cos(theta)`` (the diagonal) and
``alpha * sin(theta)`` (the pair's off-diagonal, negated in the first half): road_1 shares one angle and scale per
pair (``repeat_interleave``), road_4 has separate ones for the cosine and the sine. ``_get_delta_weight`` builds
the ``out x out`` matrix R from them as PEFT does. The merge casts R to the **weight's dtype** first and multiplies
there: ``W' = matmul(R.to(W.dtype), W)`` and, where the layer has a bias, ``b' = matmul(R.to(W.dtype), b)`` (on a
bf16 base both products run in bf16). These are reproduced op for op.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

_VARIANTS = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # values per output feature

#: adapter_config.json fields RoAd reads, with what PEFT's RoadConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "variant": ("road_1, road_2 or road_4", lambda v: v in _VARIANTS),
    "group_size": ("an even whole number from 2", lambda v: isinstance(v, int) and not isinstance(v, bool) and (
        v >= 2 and v % 2 == 0)),
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
}  # fmt: skip


class RoAd(Method):
    peft_type = "ROAD"
    name = "RoAd"
    kind = "multiplicative"
    roles = ("road_theta", "road_alpha")
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if set(tensors) != {"road_theta", "road_alpha"}:
            raise incomplete(folder, name, set(tensors), self.name)
        theta, alpha = tuple(tensors["road_theta"].shape), tuple(tensors["road_alpha"].shape)
        if len(theta) != 1 or theta != alpha:
            raise AdapterError(
                f"`{folder}`: the RoAd module `{name}` has road_theta {list(theta)} and road_alpha {list(alpha)}, "
                "but PEFT makes both one row of the same length and cannot load them.",
                fix="The adapter file is not one PEFT saved: save the adapter again with PEFT.",
            )
        settings = (
            ("variant", str(config.get("variant", "road_1"))),
            ("group_size", int(config.get("group_size", 64))),
        )
        return MethodModule(self.peft_type, name, tuple(tensors.items()), settings)

    def params(self, m: MethodModule) -> tuple[tuple[str, bool], ...]:
        return (("weight", True), ("bias", False))

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if fan_in_fan_out or len(shape) not in (1, 2) or (param == "weight") != (len(shape) == 2):
            kind = "Conv1D layer (weights stored (in, out))" if fan_in_fan_out else f"{len(shape)}-D weight"
            return Unsupported(f"RoAd on a {kind} is not merged (PEFT's RoAd adapts only Linear layers)")
        out_features, group_size, variant = shape[0], m.setting("group_size"), m.setting("variant")
        if out_features % group_size != 0:
            return (
                f"PEFT's RoAd needs the layer's {out_features} output features to be divisible by group_size = "
                f"{group_size}"
            )
        (length,) = m.shape("road_theta")
        expected = int(out_features * _VARIANTS[variant])
        if length != expected:
            return (
                f"the adapter's road_theta and road_alpha have {length} values, not the {expected} PEFT makes for "
                f"{variant} on {out_features} output features"
            )
        return None

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        orig_dtype = weight.dtype
        road_R = _get_delta_weight(
            m.setting("variant"),
            m.setting("group_size"),
            adapter_float(tensors["road_theta"]),
            adapter_float(tensors["road_alpha"]),
        )
        merged = torch.matmul(road_R.to(orig_dtype), weight)
        return merged.contiguous().to(orig_dtype)

    def describe(self, m: MethodModule) -> str:
        return f"RoAd {m.setting('variant')}, groups of {m.setting('group_size')}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        variants = ", ".join(sorted({m.setting("variant") for m in modules}))
        return f"variant = {variants}, group_size = {span([m.setting('group_size') for m in modules])}"


def _get_delta_weight(
    variant: str, group_size: int, road_theta: torch.Tensor, road_alpha: torch.Tensor
) -> torch.Tensor:
    """PEFT's ``_get_delta_weight``, op for op: the ``out x out`` matrix R."""
    import torch

    first_col, second_col = _prepare_cols(variant, group_size, road_theta, road_alpha)
    output_tensor = torch.diag(first_col)
    size = second_col.shape[0]
    swapped_second_col = second_col.reshape(-1, 2, group_size // 2)[:, [1, 0], :].flatten()
    rotated_diag_second_col = torch.diag(swapped_second_col).reshape(-1, 2, group_size // 2, size)[:, [1, 0], :, :]
    rotated_diag_second_col[:, 0, :, :] *= -1
    rotated_diag_second_col = rotated_diag_second_col.reshape(size, size)
    output_tensor += rotated_diag_second_col
    return output_tensor


def _prepare_cols(
    variant: str, group_size: int, road_theta: torch.Tensor, road_alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_prepare_cols``, op for op."""
    if variant == "road_1":
        road_theta = road_theta.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        road_alpha = road_alpha.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        theta_cos = road_theta.cos()
        theta_sin = road_theta.sin()
        first_col = road_alpha * theta_cos
        second_col = road_alpha * theta_sin
    elif variant == "road_2":
        theta_cos = road_theta.cos()
        theta_sin = road_theta.sin()
        first_col = road_alpha * theta_cos
        second_col = road_alpha * theta_sin
    else:  # road_4
        road_theta = road_theta.reshape(-1, 2, group_size)
        theta_cos = road_theta[:, 0, :].cos().flatten()
        theta_sin = road_theta[:, 1, :].sin().flatten()
        road_alpha = road_alpha.reshape(-1, 2, group_size)
        alpha_1 = road_alpha[:, 0, :].flatten()
        alpha_2 = road_alpha[:, 1, :].flatten()
        first_col = alpha_1 * theta_cos
        second_col = alpha_2 * theta_sin
    return first_col, second_col


METHOD = RoAd()
