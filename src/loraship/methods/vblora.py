"""VB-LoRA (``peft_type: VBLORA``): ``W' = W + B @ A``, every sub-vector of A and B a top-k mix of a shared bank.

PEFT 0.21: ``tuners/vblora/layer.py`` (``VBLoRALayer.update_layer``, ``Linear._get_low_rank_matrix``,
``Linear._get_lora_matrices``, ``Linear.get_delta_weight``, ``Linear.merge``), ``tuners/vblora/model.py``
(``VBLoRAModel._get_adapter_state_dict``, ``_remap_adapter_state_dict_for_load``) and ``tuners/vblora/config.py``
(``VBLoRAConfig``: ``r = 4``, ``num_vectors = 256``, ``vector_length = 256``, ``topk = 2``).

The bank ``base_model.vblora_vector_bank (num_vectors, L)`` is saved once for the model and reaches each module as
a shared tensor. Per module: ``vblora_logits_A (r, in/L, num_vectors)`` and ``vblora_logits_B (out/L, r,
num_vectors)``; with ``save_only_topk_weights`` instead ``<logits>_topk_indices`` (the top-k places) and
``<logits>_topk_weights`` (the first k-1 softmax weights), from which PEFT's loader rebuilds the logits: the last
weight as ``1 - sum``, ``log`` of them scattered into a row of ``-inf`` (fp32) — rebuilt here the same way.

``_get_low_rank_matrix``: ``topk`` of the logits, ``softmax`` of those, the weighted sum of the chosen bank vectors
(``(w[..., None] * bank[idx]).sum(-2)``); A is that reshaped to ``(r, in)``, B transposed and reshaped to ``(out,
r)``; ``Δ = B @ A`` in fp32 (PEFT holds the adapter in fp32), transposed for a Conv1D, added in place to W (one
rounding to W's dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

_BANK = "base_model.vblora_vector_bank"
_LOGITS = ("vblora_logits_A", "vblora_logits_B")
_TOPK = tuple(f"{logits}_topk_{part}" for logits in _LOGITS for part in ("indices", "weights"))


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


class VBLoRA(Method):
    peft_type = "VBLORA"
    name = "VB-LoRA"
    roles = _LOGITS + _TOPK
    shared = ("vblora_vector_bank",)
    fields: ClassVar[dict[str, tuple[str, Callable[[Any], bool]]]] = {
        "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
        "num_vectors": ("a whole number from 1", lambda v: _is_whole(v, 1)),
        "vector_length": ("a whole number from 1", lambda v: _is_whole(v, 1)),
        "topk": ("a whole number from 1", lambda v: _is_whole(v, 1)),
        "save_only_topk_weights": ("true or false", lambda v: isinstance(v, bool)),
        "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    }

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        for key in ("r", "num_vectors", "vector_length", "topk", "save_only_topk_weights"):
            if key in config and config[key] is None:
                raise AdapterError(
                    f"`{folder}` sets `{key}` to null, but PEFT's VBLoRAConfig needs a value there to merge.",
                    fix=f"Restore `{key}` as PEFT saved it with these weights, or save the adapter again with PEFT.",
                )
        topk_only = bool(config.get("save_only_topk_weights", False))
        own = set(_TOPK if topk_only else _LOGITS)
        if not own | {_BANK} <= set(tensors) or set(tensors) - own - {_BANK}:
            if set(tensors) & set(_TOPK if not topk_only else _LOGITS):
                saved = "the top-k weights only" if not topk_only else "full logits"
                raise AdapterError(
                    f"`{folder}`: the VB-LoRA module `{name}` has {saved}, but `save_only_topk_weights` is "
                    f"{'true' if topk_only else 'false'}, so PEFT cannot load it.",
                    fix="Restore `save_only_topk_weights` as PEFT saved it with these weights.",
                )
            raise incomplete(folder, name, set(tensors), self.name)
        settings = (
            ("r", int(config.get("r", 4))),
            ("topk", int(config.get("topk", 2))),
            ("num_vectors", int(config.get("num_vectors", 256))),
            ("vector_length", int(config.get("vector_length", 256))),
            ("topk_only", topk_only),
        )
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def _expected(self, m: MethodModule, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        r, k, n, length = (m.setting(key) for key in ("r", "topk", "num_vectors", "vector_length"))
        a, b = (r, in_features // length), (out_features // length, r)
        if not m.setting("topk_only"):
            return {_BANK: (n, length), "vblora_logits_A": (*a, n), "vblora_logits_B": (*b, n)}
        return {
            _BANK: (n, length),
            "vblora_logits_A_topk_indices": (*a, k),
            "vblora_logits_A_topk_weights": (*a, k - 1),
            "vblora_logits_B_topk_indices": (*b, k),
            "vblora_logits_B_topk_weights": (*b, k - 1),
        }

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if len(shape) != 2:
            return Unsupported(
                f"VB-LoRA on a {len(shape)}-D weight is not merged (PEFT's VB-LoRA adapts only Linear and Conv1D "
                "layers)"
            )
        out_features, in_features = (shape[1], shape[0]) if fan_in_fan_out else shape
        length = m.setting("vector_length")
        if out_features % length or in_features % length:
            return (
                f"PEFT's VB-LoRA needs both sizes of a layer divisible by its vector_length = {length}, and this "
                f"layer has {out_features} outputs and {in_features} inputs"
            )
        if m.setting("topk") > m.setting("num_vectors"):
            return f"its topk = {m.setting('topk')} is more than its num_vectors = {m.setting('num_vectors')}"
        for role, expected in self._expected(m, out_features, in_features).items():
            found = m.shape(role)
            if found != expected:
                return (
                    f"the adapter's {role} is {list(found)}, while PEFT builds it {list(expected)} for a layer of "
                    f"{out_features} outputs and {in_features} inputs"
                )
        return None

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        bank = adapter_float(tensors[_BANK])
        if m.setting("topk_only"):
            logits_a, logits_b = (
                _logits(tensors[f"{key}_topk_indices"], tensors[f"{key}_topk_weights"], bank.shape[0])
                for key in _LOGITS
            )
        else:
            logits_a, logits_b = (adapter_float(tensors[key]) for key in _LOGITS)
        topk = m.setting("topk")
        a = _low_rank(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
        b = _low_rank(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
        delta = b @ a
        weight += delta.T if fan_in_fan_out else delta
        return weight

    def describe(self, m: MethodModule) -> str:
        topk_only = ", top-k weights saved" if m.setting("topk_only") else ""
        return f"VB-LoRA r={m.setting('r')} top-{m.setting('topk')} of {m.setting('num_vectors')}{topk_only}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return ", ".join(
            f"{key} = {span([m.setting(key) for m in modules])}"
            for key in ("r", "topk", "num_vectors", "vector_length")
        )


def _logits(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """``VBLoRAModel._remap_adapter_state_dict_for_load``: the logits PEFT rebuilds from the saved top-k."""
    import torch

    places = indices.to(torch.long)
    weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    topk_logits = torch.log(weights)
    empty = torch.zeros([*(topk_logits.shape[:-1]), num_vectors]).fill_(float("-inf"))
    return adapter_float(empty.scatter(-1, places, topk_logits))


def _low_rank(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """``Linear._get_low_rank_matrix``."""
    import torch

    top_k_logits, indices = logits.topk(topk, dim=-1)
    topk_weights = torch.nn.functional.softmax(top_k_logits, dim=-1)
    return (topk_weights.unsqueeze(-1) * bank[indices]).sum(-2)


METHOD = VBLoRA()
