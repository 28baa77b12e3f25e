"""GLoRA (``peft_type: GLORA``): ``W' = W + (W ⊙ A + B)``, ``b' = b + (b ⊙ D + E + W @ C)``.

PEFT 0.21: ``tuners/glora/layer.py`` (``GloraLayer.update_layer``, ``GloraLayer.merge``, the ``Glora*Path`` modules)
and ``tuners/glora/config.py`` (``GloraConfig``: ``r``, ``config_A_B``, ``config_C``, ``config_D_E``). Each of A-E is
a path, saved under ``glora_<letter>.<name>``: ``lora`` (``Xd @ Xu``, ``Xd`` ``(out, r)``, ``Xu`` ``(r, in)``; C's
``(in, r)`` and ``(r, 1)``), ``vector`` (``X``: ``(out, 1)`` for A and B, ``(in, 1)`` for C, ``(out,)`` for D and E),
``constant`` (``X`` ``(1,)``, used as ``X[0]``) or none (a saved ``zeros`` buffer of the path's shape). C, D and E are
paths only on a layer with a bias; without one they are ``zeros`` and PEFT leaves the layer bias-less. PEFT adapts
Linear layers only.

The merge (one adapter): every path's value (``Xd @ Xu`` in fp32) cast to W's dtype, then in W's dtype
``W' = W.clone(); W' += W * A + B`` and, with a bias, ``b' = b.clone(); b' += b * D + E + matmul(W, C).squeeze(-1)``.
These are reproduced op for op. The bias's ``matmul(W, C)`` reads the base weight: loraship merges one base tensor
at a time, so it merges a bias only where C is PEFT's none path (its zeros: the product is zeros, taken as +0), and
refuses a module whose bias is coupled to its weight by a trained C (``config_C`` ``lora`` or ``vector``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import UnsupportedError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

_LETTERS = ("A", "B", "C", "D", "E")
_NAMES = ("Xd", "Xu", "X", "zeros")


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


#: adapter_config.json fields GLoRA reads, with what PEFT's GloraConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "config_A_B": ('"lora", "vector", "constant" or "none"', lambda v: v in ("lora", "vector", "constant", "none")),
    "config_C": ('"lora", "vector" or "none"', lambda v: v in ("lora", "vector", "none")),
    "config_D_E": ('"vector", "constant" or "none"', lambda v: v in ("vector", "constant", "none")),
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
}


def _path(have: set[str], letter: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The kind of path ``letter`` is from its saved tensors: lora, vector, constant, none (None: incomplete)."""
    names = {n for n in _NAMES if f"glora_{letter}.{n}" in have}
    if names == {"Xd", "Xu"}:
        return "lora"
    if names == {"zeros"}:
        return "none"
    if names == {"X"}:
        return "constant" if shapes[f"glora_{letter}.X"] == (1,) and letter != "C" else "vector"
    return None


class GLoRA(Method):
    peft_type = "GLORA"
    name = "GLoRA"
    kind = "multiplicative"
    roles = tuple(f"glora_{letter}.{n}" for letter in _LETTERS for n in _NAMES)
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        have = set(tensors)
        shapes = {role: tuple(info.shape) for role, info in tensors.items()}
        paths = {letter: _path(have, letter, shapes) for letter in _LETTERS}
        if any(p is None for p in paths.values()):
            raise incomplete(folder, name, have, self.name)
        settings = tuple((f"path_{letter}", str(p)) for letter, p in paths.items())
        r = shapes["glora_A.Xu"][0] if paths["A"] == "lora" else int(config.get("r", 8))
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), (*settings, ("r", r)))

    def params(self, m: MethodModule) -> tuple[tuple[str, bool], ...]:
        # PEFT rewrites the weight even where A and B are none (zeros added: the values stay, -0.0 becomes +0.0).
        # C, D and E are paths only where the layer has a bias; with all three none the bias is left as it is.
        bias = any(m.setting(f"path_{letter}") != "none" for letter in ("C", "D", "E"))
        return (("weight", True), ("bias", True)) if bias else (("weight", True),)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if fan_in_fan_out or (param == "weight" and len(shape) != 2):
            return Unsupported(
                "GLoRA on a layer other than a Linear one is not merged (PEFT adapts only Linear layers)"
            )
        if param == "bias" and m.setting("path_C") != "none":
            return Unsupported(
                f"GLoRA with a trained C ({m.setting('path_C')} path) on a layer with a bias is not merged by "
                "loraship: the merged bias b + b*D + E + W @ C reads the base weight, and loraship merges one base "
                "tensor at a time"
            )
        out_f, in_f = _out_features(m), _in_features(m)
        want = [out_f] if param == "bias" else [out_f, in_f]
        if len(shape) == len(want) and all(n is None or n == got for n, got in zip(want, shape, strict=True)):
            return None
        shown = "[" + ", ".join("?" if n is None else str(n) for n in want) + "]"
        return f"the adapter's GLoRA paths ({_paths(m)}) need a {param} of {shown}"

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        dtype = weight.dtype
        if param == "weight":
            A = _value(m, "A", tensors).to(dtype=dtype)
            B = _value(m, "B", tensors).to(dtype=dtype)
            new_weight = weight.clone()
            new_weight += weight * A + B
            return new_weight
        C = tensors["glora_C.zeros"]
        if bool(C.ne(0).any()):
            raise UnsupportedError(
                f"The GLoRA module `{m.module}` has a glora_C.zeros that is not all zeros: the merged bias would read "
                "the base weight (W @ C), which loraship does not do.",
                fix="Merge it with PEFT itself: PeftModel.from_pretrained(base, adapter).merge_and_unload(), then "
                "check the result with `loraship verify`.",
            )
        D = _value(m, "D", tensors).to(dtype=dtype)
        E = _value(m, "E", tensors).to(dtype=dtype)
        w0_c = torch.zeros(weight.shape[0], dtype=dtype)  # matmul(W, zeros).squeeze(-1)
        new_bias = weight.clone()
        new_bias += weight * D + E + w0_c
        return new_bias

    def describe(self, m: MethodModule) -> str:
        return "GLoRA " + _paths(m) + (f" r={m.setting('r')}" if "lora" in _paths(m) else "")

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        shown = sorted({_paths(m) for m in modules})
        ranks = [m.setting("r") for m in modules if "lora" in _paths(m)]
        return "; ".join(shown) + (f", r = {span(ranks)}" if ranks else "")


def _out_features(m: MethodModule) -> int | None:
    """The layer's output features, from a path that has them (None: every path that would is a constant)."""
    for letter in ("A", "B", "D", "E"):
        kind = m.setting(f"path_{letter}")
        role = {"lora": "Xd", "vector": "X", "none": "zeros"}.get(kind)
        if role is not None:
            return m.shape(f"glora_{letter}.{role}")[0]
    return None


def _in_features(m: MethodModule) -> int:
    """The layer's input features: C always has them (``(in, r)``, ``(in, 1)`` or its zeros)."""
    role = {"lora": "Xd", "vector": "X", "none": "zeros"}[m.setting("path_C")]
    return m.shape(f"glora_C.{role}")[0]


def _paths(m: MethodModule) -> str:
    return (
        f"A/B {m.setting('path_A')}, C {m.setting('path_C')}, D/E {m.setting('path_D')}"
        if m.setting("path_A") == m.setting("path_B") and m.setting("path_D") == m.setting("path_E")
        else ", ".join(f"{letter} {m.setting(f'path_{letter}')}" for letter in _LETTERS)
    )


def _value(m: MethodModule, letter: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The path's ``forward()``: ``Xd @ Xu``, ``X``, ``X[0]`` or the zeros buffer (adapter tensors in fp32)."""
    kind = m.setting(f"path_{letter}")
    if kind == "lora":
        return adapter_float(tensors[f"glora_{letter}.Xd"]) @ adapter_float(tensors[f"glora_{letter}.Xu"])
    if kind == "vector":
        return adapter_float(tensors[f"glora_{letter}.X"])
    if kind == "constant":
        return adapter_float(tensors[f"glora_{letter}.X"])[0]
    return adapter_float(tensors[f"glora_{letter}.zeros"])


METHOD = GLoRA()
