"""FourierFT (``peft_type: FOURIERFT``): ``W' = W + real(ifft2(D)) * scaling``, D a sparse spectrum.

PEFT 0.21: ``tuners/fourierft/layer.py`` (``FourierFTLayer.__init__``, ``FourierFTLayer.update_layer``,
``FourierFTLayer.get_delta_weight``, ``FourierFTLinear.merge``), ``tuners/fourierft/model.py``
(``FourierFTModel._create_and_replace``: the module's ``n_frequency`` from ``n_frequency_pattern``;
``_create_new_module``: Linear and Conv1D only, ``fan_in_fan_out`` set from the layer's type) and
``tuners/fourierft/config.py`` (``FourierFTConfig``: ``n_frequency = 1000``, ``scaling = 150.0``,
``random_loc_seed = 777``).

Only ``fourierft_spectrum`` (``n`` values) is saved. Where they go is not: ``update_layer`` draws it again from
the seed, ``randperm(out * in, generator=Generator().manual_seed(random_loc_seed))[:n]``, each index split into
the row ``i // in`` and the column ``i % in`` (``out``, ``in`` the layer's output and input features; a Conv1D
stores its weight ``(in, out)``). ``get_delta_weight``: an fp32 ``(out, in)`` zero matrix with the spectrum
(fp32: PEFT upcasts a half-precision adapter on load) scattered at those places, ``torch.fft.ifft2`` (complex64,
with the ``1 / (out * in)`` normalisation), its real part times ``scaling`` (a Python number), cast to the
spectrum's dtype. The merge adds it in place to W (transposed for a Conv1D): one rounding to W's dtype. These are
reproduced with the same torch calls, so the bits are PEFT's on CPU (the positions need torch's own ``randperm``
with a CPU generator, and ``ifft2`` on CUDA may differ from CPU in the last bit).

``n_frequency_pattern`` is matched as PEFT does: the first key (in order) with ``re.match(rf".*\\.{key}$",
module)``, else the module's full name as a key, else ``n_frequency``. Since the places come from the config,
an edited ``random_loc_seed`` cannot be seen in the adapter's tensors: only verify's comparison of outputs with
PEFT's catches it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

_SPECTRUM = "fourierft_spectrum"
#: FourierFTConfig's defaults.
_N_FREQUENCY, _SCALING, _SEED = 1000, 150.0, 777


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_seed(v: Any) -> bool:
    """What ``torch.Generator().manual_seed`` accepts (a negative seed is taken modulo 2^64)."""
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**64


#: adapter_config.json fields FourierFT reads, with what PEFT's FourierFTConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "n_frequency": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "scaling": ("a number", _is_number),
    "random_loc_seed": ("a whole number (a torch seed)", _is_seed),
    "n_frequency_pattern": ("a mapping of names to whole numbers from 1", lambda v: isinstance(v, dict) and all(
        _is_whole(x, 1) for x in v.values())),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
}  # fmt: skip


class FourierFT(Method):
    peft_type = "FOURIERFT"
    name = "FourierFT"
    roles = (_SPECTRUM,)
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if set(tensors) != {_SPECTRUM}:
            raise incomplete(folder, name, set(tensors), self.name)
        for key in ("n_frequency", "scaling", "random_loc_seed"):
            if key in config and config[key] is None:
                raise AdapterError(
                    f"`{folder}` sets `{key}` to null, but PEFT's FourierFTConfig needs a number there to merge.",
                    fix=f"Restore `{key}` as PEFT saved it with these weights, or save the adapter again with PEFT.",
                )
        shape = tuple(tensors[_SPECTRUM].shape)
        if len(shape) != 1:
            raise AdapterError(
                f"`{folder}`: the FourierFT module `{name}` has {_SPECTRUM} {list(shape)}, but PEFT saves it as one "
                "row of n_frequency values and cannot load it.",
                fix="The adapter file is not one PEFT saved: save the adapter again with PEFT.",
            )
        n, source = _n_frequency(config, name, folder)
        settings = (
            ("n", n),
            ("n_from", source),
            ("seed", int(config.get("random_loc_seed", _SEED))),
            ("scaling", config.get("scaling", _SCALING)),
        )
        return MethodModule(self.peft_type, name, tuple(tensors.items()), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if len(shape) != 2:
            return Unsupported(
                f"FourierFT on a {len(shape)}-D weight is not merged (PEFT's FourierFT adapts only Linear and Conv1D "
                "layers)"
            )
        out_features, in_features = (shape[1], shape[0]) if fan_in_fan_out else shape
        (length,), n = m.shape(_SPECTRUM), m.setting("n")
        if length != n:
            return (
                f"the adapter's {_SPECTRUM} has {length} frequencies, but its {m.setting('n_from')} = {n} makes PEFT "
                f"build one of {n}"
            )
        if n > out_features * in_features:
            return (
                f"the adapter's {_SPECTRUM} has {n} frequencies, more than the {out_features} x {in_features} = "
                f"{out_features * in_features} places of a weight of {out_features} outputs and {in_features} inputs"
            )
        return None

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        out_features, in_features = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
        delta = delta_weight(
            adapter_float(tensors[_SPECTRUM]), out_features, in_features, m.setting("seed"), m.setting("scaling")
        )
        weight += delta.T if fan_in_fan_out else delta
        return weight

    def describe(self, m: MethodModule) -> str:
        return f"FourierFT {m.setting('n')} frequencies, scaling {m.setting('scaling'):g}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return ", ".join(
            f"{field} = {span([m.setting(key) for m in modules])}"
            for field, key in (("n_frequency", "n"), ("scaling", "scaling"), ("random_loc_seed", "seed"))
        )


def _n_frequency(config: Mapping[str, Any], module: str, folder: Path) -> tuple[int, str]:
    """``FourierFTModel._create_and_replace``: a module's ``n_frequency`` and the field that set it."""
    patterns = dict(config.get("n_frequency_pattern") or {})
    for key in patterns:
        try:
            found = re.match(rf".*\.{key}$", module)
        except re.error as e:
            raise AdapterError(
                f"`{folder}`: the `n_frequency_pattern` key {key!r} is not a regular expression Python compiles "
                f"({e}), so PEFT cannot load the adapter.",
                fix="Correct the key in adapter_config.json, or save the adapter again with PEFT.",
            ) from None
        if found:
            return int(patterns[key]), f"n_frequency_pattern[{key!r}]"
    if module in patterns:
        return int(patterns[module]), f"n_frequency_pattern[{module!r}]"
    return int(config.get("n_frequency", _N_FREQUENCY)), "n_frequency"


#: The last positions drawn: (out, in, seed, n) -> (rows, cols). Layers of one shape share them.
_LAST: dict[tuple[int, int, int, int], torch.Tensor] = {}


def _indices(out_features: int, in_features: int, seed: int, n: int) -> torch.Tensor:
    """``FourierFTLayer.update_layer``'s ``indices``: a (2, n) tensor of rows and columns."""
    import torch

    key = (out_features, in_features, seed, n)
    found = _LAST.get(key)
    if found is None:
        indices = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
        found = torch.stack([indices // in_features, indices % in_features], dim=0)
        _LAST.clear()
        _LAST[key] = found
    return found


def delta_weight(
    spectrum: torch.Tensor, out_features: int, in_features: int, seed: int, scaling: float
) -> torch.Tensor:
    """``FourierFTLayer.get_delta_weight``: the ``(out, in)`` delta, in the spectrum's dtype."""
    import torch

    indices = _indices(out_features, in_features, seed, spectrum.shape[0]).to(spectrum.device)
    dense_spectrum = torch.zeros(out_features, in_features, device=spectrum.device)
    dense_spectrum[indices[0, :], indices[1, :]] = spectrum.float()
    delta = torch.fft.ifft2(dense_spectrum).real * scaling
    return delta.to(spectrum.dtype)


METHOD = FourierFT()
