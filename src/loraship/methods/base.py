"""What every PEFT method other than LoRA provides to the merge: one :class:`Method` per file.

LoRA has its own, older path (:mod:`loraship.methods.lora` and the planner's LoRA steps). Every other
method that changes weights is a :class:`Method`: it groups an adapter's saved tensors by module into
:class:`MethodModule` values (settings read from adapter_config.json as PEFT reads them), says which
base parameters a module changes and which shapes fit, and computes the merged parameter from the
base's and its own tensors, op for op as PEFT 0.21's ``merge_and_unload`` does on CPU (so the bits
are PEFT's). The planner, the streaming merge, ``verify`` and the card use only this interface, and
find the methods by their module in this package (:func:`registry`): a new method is a new file.
Method files import torch only inside their merge: reading an adapter and planning run without it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from loraship.errors import AdapterError

if TYPE_CHECKING:
    import torch


class Saved(Protocol):
    """An adapter tensor's header (the engine's ``TensorInfo``): the methods read names and shapes only."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


#: A value a module's settings hold (hashable, printable).
Setting = bool | int | float | str


class Unsupported(str):
    """A :meth:`Method.shape_problem` answer for a layer the method is not merged on at all (a kind of
    layer, not a size): the merge refuses it as unsupported rather than as a base that does not fit."""


@dataclass(frozen=True)
class MethodModule:
    """One module a PEFT method changes, without tensor data.

    Attributes:
        method: The PEFT type (``LOHA``).
        module: Module path in the adapter (``model.layers.0.self_attn.q_proj``).
        tensors: Role (the name PEFT saves it under, ``hada_w1_a``) -> the adapter tensor.
        settings: What the merge reads from the config for this module (``scale``, ``feedforward``).
    """

    method: str
    module: str
    tensors: tuple[tuple[str, Saved], ...]
    settings: tuple[tuple[str, Setting], ...] = ()

    def tensor(self, role: str) -> Saved | None:
        return next((t for r, t in self.tensors if r == role), None)

    def shape(self, role: str) -> tuple[int, ...]:
        """The shape of a tensor the module has (its method checked it is there)."""
        info = self.tensor(role)
        if info is None:
            raise KeyError(f"{self.module} has no {role}")
        return tuple(info.shape)

    def setting(self, key: str, default: Any = None) -> Any:
        return next((v for k, v in self.settings if k == key), default)

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(r for r, _ in self.tensors)


class Method:
    """A PEFT method's merge. Subclasses set the class attributes and override what differs.

    Attributes:
        peft_type: ``peft_type`` in adapter_config.json.
        name: The name users know (``LoHa``).
        kind: ``additive`` (a delta independent of W), ``multiplicative`` (needs W).
        roles: The tensor names PEFT saves per module (``<module>.<role>``).
        shared: The tensors PEFT saves once for the whole model (VeRA's projections), as
            ``base_model.<name>`` or, for a list of them, ``base_model.<name>.<i>``. Every module's
            ``tensors`` holds each one the adapter has, under its saved name (``base_model.vera_A``).
        fields: adapter_config.json fields this method reads: field -> (what PEFT expects, check).
    """

    peft_type: ClassVar[str]
    name: ClassVar[str]
    kind: ClassVar[str] = "additive"
    roles: ClassVar[tuple[str, ...]]
    shared: ClassVar[tuple[str, ...]] = ()
    fields: ClassVar[dict[str, tuple[str, Callable[[Any], bool]]]] = {}

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        """The module ``name`` from its saved tensors (role -> tensor) and the adapter's config.

        Raises:
            AdapterError: Tensors are missing or do not fit together.
        """
        raise NotImplementedError

    def refusal(self, config: Mapping[str, Any]) -> str | None:
        """Why loraship does not merge an adapter of this method with ``config`` at all (None when it does), read
        before any tensor: a setting under which the merge cannot be PEFT's."""
        return None

    def with_layers(
        self, m: MethodModule, layers: tuple[tuple[str, int, int], ...], *, ordered: bool = True
    ) -> MethodModule:
        """``m`` told every layer the adapter's modules of this method change, as ``(module, out features, in
        features)`` in the base, in the model's order of modules (``ordered``; else in the checkpoint's order, the
        model class could not be built): for a method whose shared tensors PEFT sizes to the largest layer, or that
        numbers its layers; called before :meth:`shape_problem`."""
        return m

    def params(self, m: MethodModule) -> tuple[tuple[str, bool], ...]:
        """The base parameters ``m`` changes, each with whether the base must have it."""
        return (("weight", True),)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        """Why ``m`` does not fit a base parameter of ``shape`` (None when it does), in words that name
        the adapter's tensors; an :class:`Unsupported` phrase for a kind of layer the method is not merged
        on. ``fan_in_fan_out``: the layer stores its weight (in, out) (a Conv1D)."""
        return None

    def merge(
        self,
        m: MethodModule,
        param: str,
        weight: torch.Tensor,
        tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:
        """The merged parameter: ``weight`` (the base's, in the output dtype; may be changed in place)
        with ``m`` applied, as PEFT rounds it. ``tensors`` are the module's adapter tensors as saved."""
        raise NotImplementedError

    def describe(self, m: MethodModule) -> str:
        """A short summary for the plan's table (``LoHa r=4 scale=2``)."""
        return self.name

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        """The method's settings over all its modules, for the card (``r = 4, alpha = 8``)."""
        return self.name


class RankedMethod(Method):
    """The LyCORIS methods (LoHa, LoKr): a rank ``r`` and ``alpha`` per module (``rank_pattern`` and
    ``alpha_pattern`` first), and the scale ``alpha / r``. Subclasses say which tensor sets are complete."""

    def cp(self, have: set[str]) -> bool | None:
        """Whether a module with the tensors ``have`` is CP-decomposed; None when it is incomplete."""
        raise NotImplementedError

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        cp = self.cp(set(tensors))
        if cp is None:
            raise incomplete(folder, name, set(tensors), self.name)
        r, alpha = rank_and_alpha(config, name)
        settings = (("r", r), ("alpha", alpha), ("scale", alpha / r), ("cp", cp))
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return ", ".join(f"{key} = {span([m.setting(key) for m in modules])}" for key in ("r", "alpha", "scale"))


def incomplete(folder: Path, module: str, have: frozenset[str] | set[str], method: str) -> AdapterError:
    """A module that lacks tensors its method needs."""
    return AdapterError(
        f"`{folder}`: the {method} module `{module}` has only " + ", ".join(sorted(have)) + ", not all the tensors "
        f"{method} saves for a module.",
        fix="The adapter file is incomplete: save it again with PEFT.",
    )


#: How PEFT names a tensor it saves once for the whole model (:attr:`Method.shared`).
SHARED_PREFIX = "base_model."


def shared_role(method: Method, key: str) -> bool:
    """Whether the adapter tensor ``key`` is one of ``method``'s shared tensors (``base_model.vera_A``)."""
    name = key.removeprefix(SHARED_PREFIX)
    return key.startswith(SHARED_PREFIX) and any(
        name == s or (name.startswith(s + ".") and name[len(s) + 1 :].isdigit()) for s in method.shared
    )


def adapter_float(t: torch.Tensor) -> torch.Tensor:
    """An adapter tensor as PEFT holds it after loading: ``autocast_adapter_dtype`` makes half floats fp32."""
    import torch

    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key (in order) matching the end of the module name.

    Callers check the keys with :func:`loraship.engine.patterns.check_patterns` first (bounded time).
    """
    import re

    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def rank_and_alpha(config: Mapping[str, Any], module: str, *, alpha_field: str = "alpha") -> tuple[int, float]:
    """A module's ``r`` and alpha: ``rank_pattern`` / ``alpha_pattern`` first, then the config's own."""
    ranks, alphas = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    r_key, a_key = pattern_key(ranks, module), pattern_key(alphas, module)
    r = int(ranks[r_key]) if r_key is not None else int(config.get("r", 8))
    alpha = float(alphas[a_key]) if a_key is not None else float(config.get(alpha_field, 8))
    return r, alpha


def product(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def span(values: list[float] | list[int]) -> str:
    """``4`` or ``2–8``."""
    shown = [f"{v:g}" for v in sorted(set(values))]
    return shown[0] if len(shown) == 1 else f"{shown[0]}–{shown[-1]}"


@cache
def registry() -> dict[str, Method]:
    """Every method of this package, by PEFT type (each module's ``METHOD``)."""
    import loraship.methods as package

    found: dict[str, Method] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in ("base", "lora"):  # the interface, and LoRA's math (its own path, and it imports torch)
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            found[method.peft_type] = method
    return found


def method_of(peft_type: str) -> Method | None:
    return registry().get(peft_type.upper())


def _is_number(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


#: Field checks the LyCORIS-style methods share (LoHa, LoKr): what PEFT's config expects there.
RANK_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "alpha": ("a number", _is_number),
    "rank_pattern": ("a mapping of names to ranks", lambda v: isinstance(v, dict) and all(
        _is_whole(x, 1) for x in v.values())),
    "alpha_pattern": ("a mapping of names to numbers", lambda v: isinstance(v, dict) and all(
        _is_number(x) for x in v.values())),
}  # fmt: skip
