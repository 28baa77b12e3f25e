"""LoHa (``peft_type: LOHA``): ``W' = W + ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) · alpha / r``.

PEFT 0.21: ``tuners/loha/layer.py`` (``LoHaLayer.update_layer``, ``get_delta_weight``, ``HadaWeight``,
``HadaWeightCP``) and the merge in ``tuners/lycoris_utils.py`` (``LycorisLayer.merge``:
``W += get_delta_weight()``). The scale is ``alpha / r`` (``rank_pattern`` / ``alpha_pattern`` first) as a
0-dim fp32 tensor, multiplied once after the Hadamard product; the delta is fp32 (PEFT keeps adapter
weights in fp32) and reshaped to W's shape, and the in-place add rounds once to W's dtype. With
``use_effective_conv2d`` a convolution's factors are CP-decomposed (``hada_t1``, ``hada_t2``) and
rebuilt by two einsums. Rank dropout and module dropout are training only: the merge has neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from loraship.methods.base import RANK_FIELDS, MethodModule, RankedMethod, product

if TYPE_CHECKING:
    import torch

_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_CP = ("hada_t1", "hada_t2")


class LoHa(RankedMethod):
    peft_type = "LOHA"
    name = "LoHa"
    roles = _FACTORS + _CP
    fields = RANK_FIELDS

    def cp(self, have: set[str]) -> bool | None:
        cp = bool(have & set(_CP))
        return None if not set(_FACTORS) <= have or (cp and not set(_CP) <= have) else cp

    def _delta_shape(self, m: MethodModule) -> tuple[int, ...]:
        a, b = m.shape("hada_w1_a"), m.shape("hada_w1_b")
        if m.setting("cp"):
            t = m.shape("hada_t1")
            return (a[1], b[1], *t[2:])
        return (a[0], b[1])

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        delta = self._delta_shape(m)
        fits = delta == shape if m.setting("cp") else (delta[0] == shape[0] and product(delta) == product(shape))
        if fits and not fan_in_fan_out:
            return None
        a, b = m.shape("hada_w1_a"), m.shape("hada_w1_b")
        return f"the adapter's hada_w1_a {list(a)} @ hada_w1_b {list(b)} makes {list(delta)}"

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        t = {k: v.float() for k, v in tensors.items()}
        scale = torch.tensor(m.setting("scale"))
        if m.setting("cp"):
            rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            delta = rebuild1 * rebuild2 * scale
        else:
            delta = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])) * scale
        weight += delta.reshape(weight.shape)
        return weight

    def describe(self, m: MethodModule) -> str:
        cp = " CP" if m.setting("cp") else ""
        return f"LoHa{cp} r={m.setting('r')} scale={m.setting('scale'):g}"


METHOD = LoHa()
