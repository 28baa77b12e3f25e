"""C3A (``peft_type: C3A``): ``W' = W + C / in``, C the block-circulant matrix of the adapter's kernels.

PEFT 0.21: ``tuners/c3a/layer.py`` (``C3ALayer.get_delta_weight``, ``C3ALayer.update_layer``, ``C3ALinear.merge``),
``tuners/c3a/utils.py`` (``get_circulant_fast``), ``tuners/c3a/model.py`` (``_create_and_replace``: the module's
``block_size`` from ``block_size_pattern``; ``_create_new_module``: Linear layers only) and ``tuners/c3a/config.py``
(``C3AConfig``: ``block_size = 256``).

``c3a_kernel`` is ``(out / b, in / b, b)`` (fp32), ``b`` the module's block size, which must divide ``in`` and
``out``. ``get_circulant_fast`` turns each length-``b`` kernel into its ``b x b`` circulant block with an fft / ifft of
an identity (complex64), ``(out, in)`` in all. ``get_delta_weight`` casts that to the **base weight's dtype** and
divides it by ``in`` there; the merge adds it to W in W's dtype (``W + delta``). On a bf16 or fp16 base that is three
roundings (cast, divide, add), which loraship reproduces as they are. ``block_size_pattern`` is matched as PEFT does:
the first key (in order) with ``re.match(rf".*\\.{key}$", module)``, else the module's full name as a key, else
``block_size``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


#: adapter_config.json fields C3A reads, with what PEFT's C3AConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "block_size": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "block_size_pattern": ("a mapping of names to whole numbers from 1", lambda v: isinstance(v, dict) and all(
        _is_whole(x, 1) for x in v.values())),
    "init_weights": ('true, false, "gaussian", "kaiming_uniform" or "xavier_uniform"', lambda v: isinstance(
        v, bool) or v in ("gaussian", "kaiming_uniform", "xavier_uniform")),
}  # fmt: skip


class C3A(Method):
    peft_type = "C3A"
    name = "C3A"
    roles = ("c3a_kernel",)
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if set(tensors) != {"c3a_kernel"}:
            raise incomplete(folder, name, set(tensors), self.name)
        shape = tuple(tensors["c3a_kernel"].shape)
        if len(shape) != 3:
            raise AdapterError(
                f"`{folder}`: the C3A module `{name}` has c3a_kernel {list(shape)}, but PEFT makes it "
                "(out / block_size, in / block_size, block_size) and cannot load it.",
                fix="The adapter file is not one PEFT saved: save the adapter again with PEFT.",
            )
        block_size, source = _block_size(config, name, folder)
        return MethodModule(self.peft_type, name, tuple(tensors.items()), (("b", block_size), ("b_from", source)))

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if fan_in_fan_out or len(shape) != 2:
            kind = "Conv1D layer (weights stored (in, out))" if fan_in_fan_out else f"{len(shape)}-D weight"
            return Unsupported(f"C3A on a {kind} is not merged (PEFT's C3A adapts only Linear layers)")
        (out_features, in_features), b = shape, m.setting("b")
        if in_features % b != 0 or out_features % b != 0:
            return (
                f"its {m.setting('b_from')} = {b} does not divide the layer's {out_features} output and "
                f"{in_features} input features, as PEFT's C3A needs"
            )
        expected = (out_features // b, in_features // b, b)
        saved = m.shape("c3a_kernel")
        if saved == expected:
            return None
        return f"the adapter's c3a_kernel {list(saved)} is not the {list(expected)} PEFT makes with blocks of {b}"

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        c3a_kernel = adapter_float(tensors["c3a_kernel"])
        delta_weight = get_circulant_fast(c3a_kernel.to(torch.float32)).to(weight.dtype)
        delta_weight = delta_weight / weight.size(-1)
        return weight + delta_weight

    def describe(self, m: MethodModule) -> str:
        return f"C3A blocks of {m.setting('b')}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return f"block_size = {span([m.setting('b') for m in modules])}"


def _block_size(config: Mapping[str, Any], module: str, folder: Path) -> tuple[int, str]:
    """``C3AModel._create_and_replace``: a module's block size and the field that set it."""
    patterns = dict(config.get("block_size_pattern") or {})
    for key in patterns:
        try:
            found = re.match(rf".*\.{key}$", module)
        except re.error as e:
            raise AdapterError(
                f"`{folder}`: the `block_size_pattern` key {key!r} is not a regular expression Python compiles "
                f"({e}), so PEFT cannot load the adapter.",
                fix="Correct the key in adapter_config.json, or save the adapter again with PEFT.",
            ) from None
        if found:
            return int(patterns[key]), f"block_size_pattern[{key!r}]"
    if module in patterns:
        return int(patterns[module]), f"block_size_pattern[{module!r}]"
    return int(config.get("block_size", 256)), "block_size"


def get_circulant_fast(w: torch.Tensor) -> torch.Tensor:
    """PEFT's ``c3a.utils.get_circulant_fast``, op for op: the ``(out, in)`` block-circulant matrix."""
    import torch
    from torch.fft import fft, ifft

    _, n, b = w.shape
    x = torch.eye(n * b, dtype=w.dtype, device=w.device)
    x = x.reshape(*x.shape[:-1], n, b)
    x = torch.einsum("...nb,mnb->...mb", ifft(x), fft(w))
    x = fft(x).real.flatten(start_dim=1).T
    return x


METHOD = C3A()
