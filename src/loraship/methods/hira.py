"""HiRA (``peft_type: HIRA``): ``W' = W + W ⊙ (B @ A)``, a Hadamard (element-wise) product with the base weight.

PEFT 0.21: ``tuners/hira/layer.py`` (``HiraLayer._merge``, ``Linear.get_delta_weight``,
``Embedding.get_delta_weight``, ``_ConvNd.get_delta_weight``, ``dispatch_default``) and ``tuners/hira/config.py``
(``HiraConfig``: ``r``, ``rank_pattern``; no scaling). ``hira_A`` is ``(r, in)`` and ``hira_B`` ``(out, r)`` on a
Linear or Conv1D layer; ``hira_embedding_A`` ``(r, num_embeddings)`` and ``hira_embedding_B`` ``(dim, r)`` on an
Embedding; ``(r, in, *kernel)`` and ``(out, r, 1, ...)`` on a Conv1d or Conv2d (PEFT refuses ``groups > 1``). PEFT
holds them in fp32. (PEFT also adapts Conv3d; loraship does not merge that.)

``get_delta_weight``: ``B @ A`` in fp32 (transposed for a Conv1D, and always for an Embedding); on a 1x1 Conv2d
the squeezed product, unsqueezed back; on other convolutions ``conv{1,2}d(A.transpose(0, 1), B).transpose(0, 1)``.
The merge (``_merge``): ``new_delta = zeros_like(W); new_delta += delta.to(W.dtype)``, then ``W + W * new_delta``
in W's dtype (so the product is rounded once to W's dtype, then the sum). The bias is left alone; dropout is training
only. These are reproduced op for op; PEFT's unmerged forward uses the same ``W ⊙ (B @ A)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

_LINEAR = ("hira_A", "hira_B")
_EMBEDDING = ("hira_embedding_A", "hira_embedding_B")


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


#: adapter_config.json fields HiRA reads, with what PEFT's HiraConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "rank_pattern": ("a mapping of names to ranks", lambda v: isinstance(v, dict) and all(
        _is_whole(x, 1) for x in v.values())),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "init_weights": ("true, false or \"gaussian\"", lambda v: isinstance(v, bool) or v == "gaussian"),
}  # fmt: skip


class HiRA(Method):
    peft_type = "HIRA"
    name = "HiRA"
    kind = "multiplicative"
    roles = _LINEAR + _EMBEDDING
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        have = set(tensors)
        if have == set(_LINEAR):
            a_role, b_role = _LINEAR
        elif have == set(_EMBEDDING):
            a_role, b_role = _EMBEDDING
        else:
            raise incomplete(folder, name, have, self.name)
        a, b = tuple(tensors[a_role].shape), tuple(tensors[b_role].shape)
        if len(a) < 2 or len(b) != len(a) or a[0] != b[1] or any(n != 1 for n in b[2:]):
            made = "(r, in, *kernel) and (out, r, 1, ...)" if len(a) > 2 else "(r, in) and (out, r)"
            raise AdapterError(
                f"`{folder}`: the HiRA module `{name}` has {a_role} {list(a)} and {b_role} {list(b)}, but PEFT makes "
                f"them {made} and cannot load these.",
                fix="The adapter file is damaged or not PEFT's: save the adapter again with PEFT.",
            )
        settings = (("embedding", a_role == _EMBEDDING[0]), ("r", a[0]))
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def _roles(self, m: MethodModule) -> tuple[str, str]:
        return _EMBEDDING if m.setting("embedding") else _LINEAR

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        a_role, b_role = self._roles(m)
        a, b = m.shape(a_role), m.shape(b_role)
        if len(shape) not in (2, 3, 4):
            return Unsupported(
                f"HiRA on a {len(shape)}-D weight is not merged by loraship (it merges HiRA on Linear, Conv1D, "
                "Embedding, Conv1d and Conv2d layers)"
            )
        if len(a) > 2:
            if len(shape) != len(a):
                return (
                    f"the adapter's {a_role} {list(a)} is a {len(a) - 2}-D convolution's, not a {len(shape)}-D weight's"
                )
            want: tuple[int, ...] = (b[0], a[1], *a[2:])
            if shape == want:
                return None
            return (
                f"the adapter's {a_role} {list(a)} and {b_role} {list(b)} need a {list(want)} weight (HiRA does not "
                "support grouped convolutions)"
            )
        if len(shape) != 2:
            return f"the adapter's {a_role} {list(a)} is a Linear layer's, not a {len(shape)}-D weight's"
        stored_in_out = m.setting("embedding") or fan_in_fan_out  # (num_embeddings, dim), Conv1D's (in, out)
        want = (a[1], b[0]) if stored_in_out else (b[0], a[1])
        if shape == want:
            return None
        return f"the adapter's {a_role} {list(a)} and {b_role} {list(b)} need a {list(want)} weight"

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        a_role, b_role = self._roles(m)
        delta = _delta_weight(
            adapter_float(tensors[a_role]), adapter_float(tensors[b_role]), bool(m.setting("embedding")),
            fan_in_fan_out,
        )  # fmt: skip
        base_weight = weight.detach().clone()
        new_delta = torch.zeros_like(weight)
        new_delta += delta.to(weight.dtype)
        return weight + base_weight * new_delta

    def describe(self, m: MethodModule) -> str:
        return f"HiRA{' (embedding)' if m.setting('embedding') else ''} r={m.setting('r')}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return f"r = {span([m.setting('r') for m in modules])}, W ⊙ (B @ A) added"


def _delta_weight(
    weight_A: torch.Tensor, weight_B: torch.Tensor, embedding: bool, fan_in_fan_out: bool
) -> torch.Tensor:
    """PEFT's ``get_delta_weight`` of the Linear, Embedding, Conv1d and Conv2d layers (fp32 adapter), op for op."""
    import torch.nn.functional as F

    if embedding:
        return (weight_B @ weight_A).T
    if weight_A.dim() == 3:
        return F.conv1d(weight_A.transpose(0, 1), weight_B).transpose(0, 1)
    if weight_A.dim() == 4:
        if weight_A.shape[2:4] == (1, 1):
            return (weight_B.squeeze(3).squeeze(2) @ weight_A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        return F.conv2d(weight_A.transpose(0, 1), weight_B).transpose(0, 1)
    product = weight_B @ weight_A
    return product.T if fan_in_fan_out else product


METHOD = HiRA()
