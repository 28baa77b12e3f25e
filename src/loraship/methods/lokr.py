"""LoKr (``peft_type: LOKR``): ``W' = W + kron(w1, w2) · alpha / r``.

PEFT 0.21: ``tuners/lokr/layer.py`` (``LoKrLayer.update_layer``, ``create_adapter_parameters``,
``get_delta_weight``, ``make_kron``, ``make_weight_cp``, ``factorization``) and the merge in
``tuners/lycoris_utils.py`` (``W += get_delta_weight()``). Each factor is saved whole (``lokr_w1``,
``lokr_w2``) or as a low-rank pair (``lokr_w1_a @ lokr_w1_b``; with ``decompose_both`` for w1 too), and a
convolution's w2 may be CP-decomposed (``lokr_t2`` with ``lokr_w2_a``, ``lokr_w2_b``). Which form a module
has is read from the tensors saved (``rank_pattern`` can change r per module). The scale ``alpha / r`` (a
Python float) multiplies the Kronecker product once; the delta is fp32, reshaped to W's shape, and the
in-place add rounds once to W's dtype. Rank dropout is training only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from loraship.methods.base import RANK_FIELDS, MethodModule, RankedMethod, product

if TYPE_CHECKING:
    import torch


#: adapter_config.json fields LoKr reads, with what PEFT's LoKrConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **RANK_FIELDS,
    "decompose_both": ("true or false", lambda v: isinstance(v, bool)),
    "decompose_factor": (
        "a whole number (-1 for automatic)",
        lambda v: isinstance(v, int) and not isinstance(v, bool),
    ),
}


class LoKr(RankedMethod):
    peft_type = "LOKR"
    name = "LoKr"
    roles = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    fields = _FIELDS

    def cp(self, have: set[str]) -> bool | None:
        w1_full, w1_pair = "lokr_w1" in have, {"lokr_w1_a", "lokr_w1_b"} <= have
        w2_full, w2_pair = "lokr_w2" in have, {"lokr_w2_a", "lokr_w2_b"} <= have
        cp = "lokr_t2" in have
        return None if w1_full == w1_pair or w2_full == w2_pair or (cp and not w2_pair) else cp

    def _factor_shapes(self, m: MethodModule) -> tuple[tuple[int, ...], tuple[int, ...]]:
        roles = m.roles
        w1 = m.shape("lokr_w1") if "lokr_w1" in roles else (m.shape("lokr_w1_a")[0], m.shape("lokr_w1_b")[-1])
        if "lokr_w2" in roles:
            w2 = m.shape("lokr_w2")
        elif m.setting("cp"):
            t2 = m.shape("lokr_t2")
            w2 = (m.shape("lokr_w2_a")[1], m.shape("lokr_w2_b")[1], *t2[2:])
        else:
            w2 = (m.shape("lokr_w2_a")[0], m.shape("lokr_w2_b")[-1])
        return w1, w2

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        w1, w2 = self._factor_shapes(m)
        if len(w1) != 2 or len(w2) < 2:
            return f"the adapter's LoKr factors are {list(w1)} and {list(w2)}"
        kron = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
        if kron[0] == shape[0] and product(kron) == product(shape) and not fan_in_fan_out:
            return None
        return f"the adapter's kron(w1 {list(w1)}, w2 {list(w2)}) makes {list(kron)}"

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        t = {k: v.float() for k, v in tensors.items()}
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        delta = torch.kron(w1, w2.contiguous()) * m.setting("scale")
        weight += delta.reshape(weight.shape)
        return weight

    def describe(self, m: MethodModule) -> str:
        w1, w2 = self._factor_shapes(m)
        low = [n for n, role in (("w1", "lokr_w1_a"), ("w2", "lokr_w2_a")) if role in m.roles]
        form = f" ({', '.join(low)} low-rank)" if low else ""
        factors = f"{'x'.join(map(str, w1))} ⊗ {'x'.join(map(str, w2))}"
        return f"LoKr {factors}{form} r={m.setting('r')} scale={m.setting('scale'):g}"


METHOD = LoKr()
