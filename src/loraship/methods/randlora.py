"""RandLoRA (``peft_type: RANDLORA``): full-rank updates from shared random bases scaled by trained λ and γ.

PEFT 0.21: ``tuners/randlora/model.py`` (``RandLoraModel._find_dim``, ``_init_randlora_A_randlora_B``,
``_init_randlora_A_randlora_B_sparse``, ``_kaiming_init``, ``_pre_injection_hook``), ``tuners/randlora/layer.py``
(``RandLoraLayer.update_layer``, ``UniqueBaseGrad.forward``, ``Linear.get_scaled_bases``, ``Linear.get_delta_weight``,
``Linear.merge``) and ``tuners/randlora/config.py`` (``RandLoraConfig``: ``r = 32``, ``randlora_alpha = 640``,
``projection_prng_key = 0``, ``save_projection = True``, ``sparse``, ``very_sparse``).

Per module PEFT saves ``randlora_lambda (r, nb)`` and ``randlora_gamma (nb, min(out, in))``, ``nb = ceil(min(out, in)
/ r)``; the bases are kept once for the model, ``base_model.randlora_A (r, 1, MIN)`` and ``base_model.randlora_B (MAX,
NB, r)``, with ``MIN``/``MAX`` the smaller/larger of the largest targeted layer's output and input sizes (and, with
``save_projection``, a copy of them under every module, which PEFT loads into the same buffers). Without saved bases
PEFT draws them again from ``projection_prng_key`` on a CPU generator: by default ``kaiming_uniform_(a=√5)`` of a
bf16 ``(r, 1, MIN)`` then ``NB`` bf16 ``(MAX, 1, r)`` concatenated (bf16 where accelerate says the machine has it,
else fp16), each divided by its std; ``sparse`` / ``very_sparse``: ``rand`` in fp32, set to -1 / 0 / +1 by the
thresholds ``1/(2s)`` and ``1 - 1/(2s)`` (``s`` = 3, or ``√min(MAX out, MAX in)``), divided by the std. Then PEFT moves
the shared buffers to the layers' dtype and upcasts them to fp32 (saved ones are loaded over them after that).

``get_delta_weight``: the bases sliced to the layer (``A[:, :nb, :min]``, ``B[:max, :nb, :]``), ``λ[:, :, None] * A
* γ[None]`` flattened to ``(r·nb, min)``, ``B`` flattened to ``(max, nb·r)``, arranged by which side is the smaller,
``(B_s.T @ A_s.T).T``, transposed for a Conv1D, times ``randlora_alpha / r``: fp32. The merge **rounds the delta to
W's dtype first** and adds it in place (``weight.data += delta.to(orig_dtype)``): two roundings on a half base.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span
from loraship.methods.vera import is_seed

if TYPE_CHECKING:
    import torch

_A, _B = "base_model.randlora_A", "base_model.randlora_B"
_LAMBDA, _GAMMA = "randlora_lambda", "randlora_gamma"


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bases(dim: int, r: int) -> int:
    """``num_bases``: ``ceil(dim / r)`` as PEFT computes it (a float division)."""
    n = dim / r
    return int(n) if n.is_integer() else int(n) + 1


class RandLoRA(Method):
    peft_type = "RANDLORA"
    name = "RandLoRA"
    roles = (_LAMBDA, _GAMMA, "randlora_A", "randlora_B")
    shared = ("randlora_A", "randlora_B")
    fields: ClassVar[dict[str, tuple[str, Callable[[Any], bool]]]] = {
        "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
        "randlora_alpha": ("a number", _is_number),
        "projection_prng_key": ("a whole number (a torch seed)", is_seed),
        "save_projection": ("true or false", lambda v: isinstance(v, bool)),
        "sparse": ("true or false", lambda v: isinstance(v, bool)),
        "very_sparse": ("true or false", lambda v: isinstance(v, bool)),
        "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
        "init_weights": ("true or false", lambda v: isinstance(v, bool)),
    }

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if not {_LAMBDA, _GAMMA} <= set(tensors):
            raise incomplete(folder, name, set(tensors), self.name)
        for key in ("r", "randlora_alpha", "projection_prng_key", "save_projection"):
            if key in config and config[key] is None:
                raise AdapterError(
                    f"`{folder}` sets `{key}` to null, but PEFT's RandLoraConfig needs a value there to merge.",
                    fix=f"Restore `{key}` as PEFT saved it with these weights, or save the adapter again with PEFT.",
                )
        save = bool(config.get("save_projection", True))
        saved = {_A, _B} & set(tensors)
        if save and len(saved) < 2:
            raise AdapterError(
                f"`{folder}` sets `save_projection` to true, but the adapter file lacks "
                + " and ".join(f"`{k}`" for k in sorted({_A, _B} - saved))
                + ": PEFT refuses to load such a RandLoRA adapter.",
                fix="Restore the adapter file PEFT saved, or set `save_projection` to false if it was trained with "
                "bases drawn from `projection_prng_key`.",
            )
        if not save and (saved or {"randlora_A", "randlora_B"} & set(tensors)):
            raise AdapterError(
                f"`{folder}` sets `save_projection` to false, but the adapter file holds RandLoRA bases: PEFT would "
                "ignore them and draw the bases again from `projection_prng_key`, so which ones the adapter was "
                "trained with is unclear.",
                fix="Set `save_projection` to true if the saved bases are the ones the adapter was trained with; "
                "otherwise remove them from the adapter file.",
            )
        r = int(config.get("r", 32))
        variant = "very_sparse" if config.get("very_sparse") else "sparse" if config.get("sparse") else "dense"
        settings = (
            ("r", r),
            ("alpha", config.get("randlora_alpha", 640)),
            ("scaling", config.get("randlora_alpha", 640) / r),
            ("seed", int(config.get("projection_prng_key", 0))),
            ("save_projection", save),
            ("variant", variant),
        )
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def with_layers(
        self, m: MethodModule, layers: tuple[tuple[str, int, int], ...], *, ordered: bool = True
    ) -> MethodModule:
        if not layers:
            return m
        largest = (("max_out", max(o for _, o, _ in layers)), ("max_in", max(i for _, _, i in layers)))
        kept = tuple((k, v) for k, v in m.settings if k not in ("max_out", "max_in"))
        return MethodModule(m.method, m.module, m.tensors, kept + largest)

    def _base_shapes(self, m: MethodModule) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        r, out_dim, in_dim = m.setting("r"), m.setting("max_out"), m.setting("max_in")
        low, high = min(out_dim, in_dim), max(out_dim, in_dim)
        return (r, 1, low), (high, _bases(low, r), r)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if len(shape) != 2:
            return Unsupported(
                f"RandLoRA on a {len(shape)}-D weight is not merged (PEFT's RandLoRA adapts only Linear and Conv1D "
                "layers)"
            )
        out_features, in_features = (shape[1], shape[0]) if fan_in_fan_out else shape
        r, low = m.setting("r"), min(out_features, in_features)
        nb = _bases(low, r)
        for role, expected in ((_LAMBDA, (r, nb)), (_GAMMA, (nb, low))):
            found = m.shape(role)
            if found != expected:
                return (
                    f"the adapter's {role} is {list(found)}, while PEFT builds it {list(expected)} for a layer of "
                    f"{out_features} outputs and {in_features} inputs with r = {r}"
                )
        shape_a, shape_b = self._base_shapes(m)
        for key, wanted in ((_A, shape_a), (_B, shape_b)):
            info = m.tensor(key)
            if info is not None and tuple(info.shape) != wanted:
                return (
                    f"the adapter's {key} is {list(info.shape)}, while PEFT builds it {list(wanted)} for the largest "
                    f"layers this base has where the adapter applies ({m.setting('max_out')} outputs, "
                    f"{m.setting('max_in')} inputs, r = {r})"
                )
        return None

    def bases(
        self, m: MethodModule, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared bases as PEFT holds them when it merges into layers of ``dtype``."""
        if m.setting("save_projection"):
            return adapter_float(tensors[_A]), adapter_float(tensors[_B])
        shape_a, shape_b = self._base_shapes(m)
        key = (shape_a, shape_b, m.setting("seed"), m.setting("variant"), dtype)
        if key not in _LAST:  # every layer shares them: drawn once
            if m.setting("variant") == "dense":
                a, b = _dense_bases(shape_a, shape_b, m.setting("seed"))
            else:
                low = min(m.setting("max_out"), m.setting("max_in"))
                sparsity = math.sqrt(low) if m.setting("variant") == "very_sparse" else 3
                a, b = _sparse_bases(shape_a, shape_b, m.setting("seed"), sparsity)
            _LAST.clear()
            _LAST[key] = a.to(dtype).float(), b.to(dtype).float()
        return _LAST[key]

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        out_features, in_features = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
        randlora_a, randlora_b = self.bases(m, tensors, weight.dtype)
        randlora_lambda, randlora_gamma = adapter_float(tensors[_LAMBDA]), adapter_float(tensors[_GAMMA])
        min_dim, max_dim = min(out_features, in_features), max(out_features, in_features)
        num_bases = _bases(min_dim, m.setting("r"))
        sliced_a = randlora_a[:, :num_bases, :min_dim]
        sliced_b = randlora_b[:max_dim, :num_bases, :]
        update_b = sliced_b.flatten(start_dim=1)
        update_a = (randlora_lambda[:, :, None] * sliced_a * randlora_gamma[None,]).flatten(end_dim=1)
        if min_dim == in_features:
            first, second = update_a, update_b
        else:
            first, second = update_b.T, update_a.T
        update = (first.T @ second.T).T
        delta = (update.T if fan_in_fan_out else update) * m.setting("scaling")
        weight += delta.to(weight.dtype)
        return weight

    def describe(self, m: MethodModule) -> str:
        variant = "" if m.setting("variant") == "dense" else f" {m.setting('variant').replace('_', ' ')}"
        drawn = "" if m.setting("save_projection") else f", bases from seed {m.setting('seed')}"
        return f"RandLoRA{variant} r={m.setting('r')} scaling={m.setting('scaling'):g}{drawn}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return ", ".join(
            f"{field} = {span([m.setting(key) for m in modules])}"
            for field, key in (("r", "r"), ("randlora_alpha", "alpha"), ("projection_prng_key", "seed"))
        )


#: The bases last drawn: (A's shape, B's shape, seed, variant, layer dtype) -> (A, B). Read only.
_LAST: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def _half() -> torch.dtype:
    """The dtype PEFT's ``_kaiming_init`` draws in: bf16 where accelerate's ``is_bf16_available`` says so (no CUDA,
    or a CUDA device that supports it), else fp16."""
    import torch

    return torch.float16 if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else torch.bfloat16


def _dense_bases(
    shape_a: tuple[int, int, int], shape_b: tuple[int, int, int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``RandLoraModel._init_randlora_A_randlora_B``."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        a = torch.nn.init.kaiming_uniform_(torch.empty(shape_a, dtype=_half()), a=math.sqrt(5), generator=generator)
        high, num_bases, r = shape_b
        b = torch.cat(
            [
                torch.nn.init.kaiming_uniform_(
                    torch.empty((high, 1, r), dtype=_half()), a=math.sqrt(5), generator=generator
                )
                for _ in range(num_bases)
            ],
            dim=1,
        )
        return a / a.std(), b / b.std()


def _sparse_bases(
    shape_a: tuple[int, int, int], shape_b: tuple[int, int, int], seed: int, sparsity: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``RandLoraModel._init_randlora_A_randlora_B_sparse``."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.rand(shape_a, generator=generator)
    b = torch.rand(shape_b, generator=generator)
    b_sparse = torch.zeros(b.shape)
    a_sparse = torch.zeros(a.shape)
    b_sparse[b < 1 / (2 * sparsity)] = -1
    b_sparse[b > 1 - 1 / (2 * sparsity)] = 1
    a_sparse[a < 1 / (2 * sparsity)] = -1
    a_sparse[a > 1 - 1 / (2 * sparsity)] = 1
    return a_sparse / a_sparse.std(), b_sparse / b_sparse.std()


METHOD = RandLoRA()
