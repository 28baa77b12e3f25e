"""MiSS (``peft_type: MISS``): a shared block added across W's input columns ("balance" and "mini"), or
``W + W_kj @ B_j + B_j`` on each ``r x r`` block of W ("bat").

PEFT 0.21: ``tuners/miss/layer.py`` (``MissLayer.update_layer``, ``reset_*_parameters``, ``MissLinear.merge``,
``MissLinear.get_delta_weight``, ``MissLinear.get_delta_weight_miss``), ``tuners/miss/model.py``
(``_get_tuner_layer_class``: Linear layers only; ``r`` from the config, no pattern) and
``tuners/miss/config.py`` (``MissConfig``: ``r = 64``, ``mini_r = 1``, ``init_weights`` True / False (balance, the
block zero or random), ``"bat"`` or ``"mini"``).

``miss_block`` (fp32: PEFT upcasts a half-precision adapter on load) is ``(r, out)`` for balance, ``(r, mini_r)`` for
mini (repeated ``out / mini_r`` times along its second axis, so ``out % mini_r`` must be 0) and ``(out / r, r, r)``
for bat (``r`` must divide both ``in`` and ``out``); PEFT refuses ``r > in``.

balance / mini (``get_delta_weight_miss``, the *merged* weight, not a delta): ``W'[o, c] = W[o, c] + B[c mod r, o]``,
as ``(W.reshape(-1, in / r, r).permute(1, 2, 0) + B).permute(2, 0, 1).reshape(W.shape)`` (fp32) rounded once to W's
dtype. When ``r`` does not divide ``in``, PEFT writes the aligned columns and then the last ``in % r`` ones (the first
``in % r`` rows of B) into W itself, each element rounded once.
bat (``get_delta_weight``): W in fp32 viewed ``(in / r, out / r, r, r)`` (``reshape(out / r, r, in / r, r)
.permute(2, 0, 1, 3)``), ``W_kj @ B_j + B_j`` permuted back to ``(out, in)``, added in place to W (one rounding).
These are reproduced op for op. Biases are left alone; ``miss_dropout`` is training only.

BONE, MiSS's old name (``bone_block``), is not merged: PEFT 0.21 has no BONE type any more and cannot load such an
adapter, so there is no PEFT merge to match.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


#: adapter_config.json fields MiSS reads, with what PEFT's MissConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "mini_r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "init_weights": ('true, false, "bat" or "mini"', lambda v: isinstance(v, bool) or v in ("bat", "mini")),
    "miss_dropout": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
}


class MiSS(Method):
    peft_type = "MISS"
    name = "MiSS"
    kind = "multiplicative"  # bat's change is built from W (balance and mini add a block independent of it)
    roles = ("miss_block",)
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if set(tensors) != {"miss_block"}:
            raise incomplete(folder, name, set(tensors), self.name)
        init = config.get("init_weights", True)
        mode = init if init in ("bat", "mini") else "balance"
        dims = len(tensors["miss_block"].shape)
        if dims != (3 if mode == "bat" else 2):
            raise AdapterError(
                f"`{folder}`: the MiSS module `{name}` has a {dims}-D miss_block, but PEFT makes it "
                f"{'3-D' if mode == 'bat' else '2-D'} for init_weights = {init!r} and cannot load it.",
                fix="The adapter file does not match its adapter_config.json: save the adapter again with PEFT.",
            )
        settings = (("mode", mode), ("r", int(config.get("r", 64))), ("mini_r", int(config.get("mini_r", 1))))
        return MethodModule(self.peft_type, name, tuple(tensors.items()), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if fan_in_fan_out or len(shape) != 2:
            kind = "Conv1D layer (weights stored (in, out))" if fan_in_fan_out else f"{len(shape)}-D weight"
            return Unsupported(f"MiSS on a {kind} is not merged (PEFT's MiSS adapts only Linear layers)")
        (out_features, in_features), r, mode = shape, m.setting("r"), m.setting("mode")
        if r > in_features:
            return f"PEFT's MiSS needs r = {r} to be at most the layer's {in_features} input features"
        if mode == "bat":
            if in_features % r != 0 or out_features % r != 0:
                return f"PEFT's MiSS bat needs r = {r} to divide the layer's {out_features} x {in_features} weight"
            expected: tuple[int, ...] = (out_features // r, r, r)
        elif mode == "mini":
            mini_r = m.setting("mini_r")
            if out_features % mini_r != 0:
                return f"PEFT's MiSS mini needs mini_r = {mini_r} to divide the layer's {out_features} output features"
            expected = (r, mini_r)
        else:
            expected = (r, out_features)
        saved = m.shape("miss_block")
        if saved == expected:
            return None
        return (
            f"the adapter's miss_block {list(saved)} is not the {list(expected)} PEFT makes for MiSS {mode} with "
            f"r = {r} on {out_features} output and {in_features} input features"
        )

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        miss_B = adapter_float(tensors["miss_block"])
        if m.setting("mode") == "bat":
            weight += _bat_delta(miss_B, weight)
            return weight
        orig_dtype = weight.dtype
        return _merged_miss(miss_B, weight, m.setting("mode") == "mini", m.setting("mini_r")).to(orig_dtype)

    def describe(self, m: MethodModule) -> str:
        mini = f", mini_r={m.setting('mini_r')}" if m.setting("mode") == "mini" else ""
        return f"MiSS {m.setting('mode')} r={m.setting('r')}{mini}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        modes = ", ".join(sorted({m.setting("mode") for m in modules}))
        return f"{modes}, r = {span([m.setting('r') for m in modules])}"


def _bat_delta(miss_B: torch.Tensor, orig_weight: torch.Tensor) -> torch.Tensor:
    """PEFT's ``MissLinear.get_delta_weight`` (``reverse=False``), op for op."""
    orig_weight = orig_weight.to(miss_B.dtype)
    r = miss_B.size(-1)
    W = orig_weight.reshape(orig_weight.size(0) // r, r, orig_weight.size(1) // r, r).permute(2, 0, 1, 3)
    result = W @ miss_B + miss_B
    return result.permute(1, 2, 0, 3).reshape(*orig_weight.shape)


def _merged_miss(miss_B: torch.Tensor, orig_weight: torch.Tensor, mini: bool, mini_r: int) -> torch.Tensor:
    """PEFT's ``MissLinear.get_delta_weight_miss`` (``reverse=False``), op for op: the merged weight."""
    in_features = orig_weight.size(-1)
    out_features = orig_weight.size(0)
    r = miss_B.size(0)
    if mini:
        miss_B = miss_B.repeat(1, out_features // mini_r)
    if in_features % r != 0:
        remainder = in_features % r
        n_blocks = in_features // r
        aligned_size = n_blocks * r
        W_aligned = orig_weight[:, :aligned_size].reshape(-1, n_blocks, r).permute(1, 2, 0)
        orig_weight[:, :aligned_size] = (
            (W_aligned + miss_B).permute(2, 0, 1).reshape(*orig_weight[:, :aligned_size].shape)
        )
        orig_weight[:, aligned_size:] = orig_weight[:, aligned_size:] + miss_B.transpose(0, 1)[:, :remainder]
        return orig_weight
    W_blocks = orig_weight.reshape(-1, orig_weight.size(1) // r, r).permute(1, 2, 0)
    return (W_blocks + miss_B).permute(2, 0, 1).reshape(*orig_weight.shape)


METHOD = MiSS()
