"""A PEFT adapter folder, read into an :class:`AdapterSpec`: what it changes and by how much.

``parse_adapter`` is pure (config dict + tensor headers in, spec out); ``load_adapter`` does the
file reading around it. Nothing here reads tensor data, except converting an opted-in pickled
``adapter_model.bin`` to safetensors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraship.engine.patterns import check_patterns
from loraship.engine.safetensors_io import TensorInfo, read_header
from loraship.errors import AdapterError, UnsupportedError, first_line
from loraship.methods.base import MethodModule, method_of, pattern_key, registry, shared_role

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

#: PEFT methods PEFT merges that loraship does not merge (a registered method is merged), with why where it is known.
_MERGEABLE_ELSEWHERE = {
    "FROD": "PEFT derives each layer's U at load from a projection it recomputes from all the category's base weights "
    "together (every q_proj stacked, say), which loraship's merge of one base tensor at a time cannot do",
    "ADAMSS": "PEFT assigns each layer's rows to its subspaces at load by a scikit-learn KMeans clustering of the "
    "layer's base weight, which the adapter does not save and loraship does not reproduce",
}
#: PEFT methods with no weight delta to merge, with why.
_NOT_MERGEABLE = {
    **dict.fromkeys(
        (
            "PROMPT_TUNING",
            "PREFIX_TUNING",
            "P_TUNING",
            "MULTITASK_PROMPT_TUNING",
            "ADAPTION_PROMPT",
            "CPT",
            "CARTRIDGE",
        ),
        "it adds virtual tokens (or attention prefixes) at run time and has no weight delta that could be merged "
        "into the base model",
    ),
    "XLORA": "it mixes several LoRAs differently for every input, so no single weight delta stands for it",
    "POLY": "it routes each input to its task's LoRA mix by a task id, so no single weight delta stands for it",
    "LILY": "PEFT itself cannot merge it (its merge is not implemented)",
    "SHADOW": "it runs a side network next to the model, which no weight delta stands for (PEFT cannot merge it)",
    "BONE": "PEFT 0.21 no longer has the BONE type and cannot load it, so there is no PEFT merge to match; its "
    "successor MiSS is merged by loraship",
}
#: What to do instead, where shipping the adapter unmerged is not it.
_NOT_MERGEABLE_FIX = {
    "BONE": "Load it with PEFT's MiSS, BONE's successor (save it again as a MiSS adapter), and merge that.",
}
#: Methods merged as replacements of base parameters or rows (no registered Method needed).
_REPLACING = {"LN_TUNING", "TRAINABLE_TOKENS"}
#: LoRA variants whose merge differs from plain LoRA/DoRA (config field -> name users know).
_VARIANT_FIELDS = {
    "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow",
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "use_qalora": "QA-LoRA",
}
#: init_lora_weights values that rewrite the base weights at initialisation: the adapter then only
#: fits that rewritten base, unless it was converted when saved.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")

_LORA_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "B_bias"),
    (".lora_embedding_A", "A"),
    (".lora_embedding_B", "B"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".token_adapter.trainable_tokens_delta", "tokens"),
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``W' = W + scale · B @ A`` (plus DoRA / bias when present).

    Attributes:
        module: Module path in the adapter (``model.layers.0.self_attn.q_proj``).
        layer: ``embedding`` for ``lora_embedding_*`` tensors, else ``linear`` (Linear, Conv1D, Conv).
        a: The ``lora_A`` tensor.
        b: The ``lora_B`` tensor.
        rank: The rank, read from ``lora_A``'s shape.
        alpha: ``lora_alpha`` for this module (after ``alpha_pattern``).
        scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA.
        magnitude: DoRA magnitude vector, if DoRA.
        bias: ``lora_B.bias`` (``lora_bias=True``), if present.
        param: The base parameter changed: ``weight``, or a raw parameter for ``target_parameters``.
        experts: Number of experts for a ``target_parameters`` LoRA on a 3-D expert parameter.
        wraps_parameter: PEFT wraps the raw parameter (``target_parameters``: a ``ParamWrapper``, which
            rounds the delta to the parameter's dtype before adding), even when it is named ``weight``.
    """

    module: str
    layer: Literal["linear", "embedding"]
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    scale: float
    magnitude: TensorInfo | None = None
    bias: TensorInfo | None = None
    param: str = "weight"
    experts: int | None = None
    wraps_parameter: bool = False


@dataclass(frozen=True)
class Replacement:
    """A full trained copy of a base parameter saved in the adapter: it replaces the base's.

    Attributes:
        module: Module path in the adapter.
        param: Parameter name (``weight``, ``bias``).
        tensor: The adapter tensor.
        origin: Why the adapter carries it: ``modules_to_save``, ``saved_base_layer`` (e.g. resized
            embeddings), ``bias`` (``bias="all"`` / ``"lora_only"``, ``"hra_only"``...), or ``ln_tuning``
            (LN tuning's trained norm, which PEFT's merge swaps in for the base's).
    """

    module: str
    param: str
    tensor: TensorInfo
    origin: Literal["modules_to_save", "saved_base_layer", "bias", "ln_tuning"]


@dataclass(frozen=True)
class TokenUpdate:
    """``trainable_token_indices``: rows ``indices`` of an embedding replaced by ``tensor``."""

    module: str
    tensor: TensorInfo
    indices: tuple[int, ...]


@dataclass(frozen=True)
class AdapterSpec:
    """Everything the merge needs to know about an adapter, without tensor data."""

    folder: Path
    config: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo]
    lora_modules: tuple[LoraModule, ...]
    replacements: tuple[Replacement, ...]
    token_updates: tuple[TokenUpdate, ...]
    #: Adapter tensors that PEFT saves but that carry nothing to apply (with the reason).
    ignored: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    #: The modules of a method other than LoRA (:mod:`loraship.methods`).
    method_modules: tuple[MethodModule, ...] = ()

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type") or "LORA").upper()

    @property
    def method(self) -> str:
        """The method's name as users know it (``LoRA``, ``LoHa``, ``LN tuning``)."""
        return method_name(self.peft_type)

    @property
    def r(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    @property
    def base_model_name_or_path(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    @property
    def base_model_class(self) -> str | None:
        mapping = self.config.get("auto_mapping") or {}
        value = mapping.get("base_model_class") if isinstance(mapping, dict) else None
        return str(value) if value else None

    @property
    def ensure_weight_tying(self) -> bool:
        return bool(self.config.get("ensure_weight_tying"))


def settings_summary(spec: AdapterSpec) -> str:
    """The method's settings in words: ``r = 16, alpha = 32, scale = 2 (rsLoRA)`` for LoRA (patterns as
    ranges), the method's own summary for the others, then what else the adapter trains."""
    from loraship.methods.base import span

    if spec.peft_type == "LORA":
        modules = spec.lora_modules
        parts = [f"r = {span([m.rank for m in modules])}", f"alpha = {span([m.alpha for m in modules])}",
                 f"scale = {span([m.scale for m in modules])}"] if modules else []  # fmt: skip
        kinds = [k for k, on in (("rsLoRA", spec.use_rslora), ("DoRA", spec.use_dora)) if on]
        text = ", ".join(parts) + (f" ({', '.join(kinds)})" if kinds else "")
    elif spec.method_modules:
        method = method_of(spec.peft_type)
        assert method is not None
        text = method.summary(spec.method_modules)
    else:
        text = ""
    extras = []
    norms = sum(1 for r in spec.replacements if r.origin == "ln_tuning")
    if norms:
        extras.append(f"{norms} trained norm tensors")
    if len(spec.replacements) > norms:
        extras.append(f"{len(spec.replacements) - norms} trained full tensors (modules_to_save / saved layers)")
    if spec.token_updates:
        extras.append(f"{sum(len(u.indices) for u in spec.token_updates)} trainable token rows")
    if not text:
        return ", ".join(extras) or "nothing"
    return text + ("; plus " + ", ".join(extras) if extras else "")


# --------------------------------------------------------------------------- loading


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """An adapter folder's adapter_config.json, checked (types, method) before any weight is read.

    Raises:
        AdapterError: The folder is not a PEFT adapter, or its config is malformed.
        UnsupportedError: The adapter uses a method or variant loraship cannot merge.
    """
    if not folder.is_dir():
        raise AdapterError(
            f"Adapter folder `{folder}` does not exist.",
            fix="Pass the folder that PeftModel.save_pretrained() wrote (or a Hub repo id with `loraship run`).",
        )
    config_path = folder / CONFIG_NAME
    named = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}")) if not config_path.is_file() else []
    if named:
        raise AdapterError(
            f"`{folder}` has no {CONFIG_NAME}, but its subfolder(s) "
            + ", ".join(f"`{name}`" for name in named)
            + " hold a PEFT adapter (save_pretrained() writes an adapter that is not named `default` into a "
            "subfolder of its name).",
            fix=f"Point --adapter at the adapter's own folder, e.g. `{folder / named[0]}`.",
        )
    if not config_path.is_file():
        hint = (
            " (it holds a config.json: is it a full model rather than an adapter?)"
            if (folder / "config.json").is_file()
            else ""
        )
        raise AdapterError(
            f"`{folder}` has no {CONFIG_NAME}: it is not a PEFT adapter folder{hint}.",
            fix=f"Point --adapter at the folder PeftModel.save_pretrained() wrote: it holds {CONFIG_NAME} "
            f"and {WEIGHTS_NAME}.",
        )
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise AdapterError(
            f"`{config_path}` is not valid JSON ({why}).",
            fix="Restore the file PEFT wrote, or save the adapter again with save_pretrained().",
        ) from e
    check_method(config, config_path)
    check_config_types(config, config_path)
    return config


def load_adapter(
    folder: Path,
    *,
    allow_pickle: bool = False,
    scratch: Path | None = None,
    param_order: Callable[[str], Sequence[str]] | None = None,
) -> AdapterSpec:
    """Read an adapter folder as ``PeftModel.save_pretrained`` writes it.

    Args:
        folder: The adapter folder.
        allow_pickle: Accept weights stored only as pickled ``adapter_model.bin`` (loaded with
            ``torch.load(weights_only=True)`` and converted to safetensors in ``scratch``).
        scratch: A folder for that conversion; required with ``allow_pickle``.
        param_order: A module's own parameter names in registration order (from the model); needed
            to tell apart several ``target_parameters`` of one module, which PEFT nests in that order.

    Raises:
        AdapterError: The folder is not a PEFT adapter, or its weights are missing or refused.
        UnsupportedError: The adapter uses a method or variant loraship cannot merge.
    """
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = folder / PICKLE_NAME
        if not pickled.is_file():
            raise AdapterError(
                f"`{folder}` has {CONFIG_NAME} but no adapter weights ({WEIGHTS_NAME}).",
                fix="Copy or download the adapter's weights file next to its config.",
            )
        if not allow_pickle:
            raise AdapterError(
                f"`{folder}` holds its adapter weights only as a pickled {PICKLE_NAME}. Loading a pickle "
                "can run arbitrary code, so loraship refuses it by default.",
                fix="If you trust this adapter, pass --allow-pickle (it is then loaded with "
                "torch.load(weights_only=True)); or convert it once with PEFT: "
                "PeftModel.from_pretrained(base, adapter).save_pretrained(out_dir) writes safetensors.",
            )
        if scratch is None:
            raise ValueError("load_adapter(allow_pickle=True) needs a scratch folder")
        weights = _convert_pickle(pickled, scratch)
    _, tensors = read_header(weights)
    if not tensors:
        raise AdapterError(
            f"`{weights}` holds no tensors: merging it would change nothing.",
            fix="Point --adapter at the folder PeftModel.save_pretrained() wrote after training.",
        )
    check_patterns(config, module_names(tensors), where=folder / CONFIG_NAME)
    return parse_adapter(config, tensors, folder=folder, param_order=param_order)


def module_names(tensors: Iterable[str]) -> set[str]:
    """Every module path the adapter's tensor names pass through (without PEFT's prefix)."""
    out: set[str] = set()
    for key in tensors:
        pieces = key.removeprefix(PREFIX).split(".")
        out.update(".".join(pieces[: i + 1]) for i in range(len(pieces) - 1))
    return out


def _convert_pickle(pickled: Path, scratch: Path) -> Path:

    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, EOFError, RuntimeError, ... whatever the bytes provoke
        raise AdapterError(
            f"`{pickled}` could not be loaded with torch.load(weights_only=True): {first_line(e)}",
            fix="The file holds more than tensors (or is corrupt): convert the adapter to safetensors "
            "where you trust it, with PeftModel.save_pretrained().",
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(
            f"`{pickled}` does not hold a state dict of tensors.",
            fix="Save the adapter again with PeftModel.save_pretrained().",
        )
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / WEIGHTS_NAME
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"format": "pt"})
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


#: The adapter_config.json fields LoRA reads (with the JSON PEFT's LoraConfig accepts); each other
#: method names its own (``Method.fields``).
_LORA_FIELDS: dict[str, tuple[str, Any]] = {
    "r": ("a whole number from 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    "lora_alpha": ("a number", _is_number),
    "rank_pattern": ("a mapping of names to ranks", lambda v: isinstance(v, dict) and all(
        isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v.values())),
    "alpha_pattern": ("a mapping of names to numbers", lambda v: isinstance(v, dict) and all(
        _is_number(x) for x in v.values())),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "lora_bias": ("true or false", lambda v: isinstance(v, bool)),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "ensure_weight_tying": ("true or false", lambda v: isinstance(v, bool)),
    "init_lora_weights": ("true, false or an initialization name", lambda v: isinstance(v, (bool, str))),
    "target_parameters": ("a list of parameter names", _is_names),
    "trainable_token_indices": ("a list of token ids or a mapping of names to them", lambda v: (
        isinstance(v, list) and all(isinstance(x, int) for x in v)) or (isinstance(v, dict) and all(
        isinstance(x, list) and all(isinstance(i, int) for i in x) for x in v.values()))),
}  # fmt: skip
#: The fields every method's config has.
_FIELD_TYPES: dict[str, tuple[str, Any]] = {
    "target_modules": ("a module name pattern or a list of names", lambda v: isinstance(v, str) or _is_names(v)),
    "modules_to_save": ("a list of module names", _is_names),
    "bias": ('"none", "all" or "<method>_only" ("lora_only", "hra_only"...)', lambda v: isinstance(v, str) and (
        v in ("none", "all") or (v.endswith("_only") and v[:-5].isalnum()))),
    "peft_type": ("a PEFT method name", lambda v: isinstance(v, str)),
    "task_type": ("a task name", lambda v: isinstance(v, str)),
    "base_model_name_or_path": ("a repo id or a path", lambda v: isinstance(v, str)),
    "revision": ("a revision", lambda v: isinstance(v, str)),
    "layers_to_transform": ("a layer number from 0 or a list of them", lambda v: _is_index(v) or (
        isinstance(v, list) and all(_is_index(x) for x in v))),
    "layers_pattern": ("a name or a list of names", lambda v: isinstance(v, str) or _is_names(v)),
    "token_indices": ("a list of token ids", lambda v: isinstance(v, list) and all(_is_index(x) for x in v)),
}  # fmt: skip


def check_config_types(config: Mapping[str, Any], where: Path | str) -> None:
    """Refuse an adapter_config.json field of the wrong JSON type (PEFT would fail deep inside, or misread it).

    Raises:
        AdapterError: Naming the field, its value and what PEFT expects.
    """
    peft_type = str(config.get("peft_type") or "LORA").upper()
    method = method_of(peft_type)
    own = _LORA_FIELDS if peft_type == "LORA" else (method.fields if method is not None else {})
    for key, (expected, ok) in {**_FIELD_TYPES, **own}.items():
        value = config.get(key)
        if value is not None and not ok(value):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise AdapterError(
                f"`{where}` sets `{key}` to {shown}, but PEFT expects {expected} there.",
                fix=f"Correct the field (see PEFT's {_config_class(peft_type)}), or save the adapter again with "
                "save_pretrained().",
            )


def supported_methods() -> str:
    """The methods loraship merges, in words."""
    names = sorted(m.name for m in registry().values())
    return "LoRA (with rsLoRA, DoRA), " + ", ".join(names) + ", LN tuning and trainable tokens"


def method_name(peft_type: str) -> str:
    """The name users know for a PEFT type (``LOHA`` -> ``LoHa``)."""
    found = method_of(peft_type)
    names = {"LORA": "LoRA", "LN_TUNING": "LN tuning", "TRAINABLE_TOKENS": "trainable tokens"}
    return found.name if found is not None else names.get(peft_type.upper(), peft_type)


def _config_class(peft_type: str) -> str:
    names = {"LORA": "LoraConfig", "LN_TUNING": "LNTuningConfig", "TRAINABLE_TOKENS": "TrainableTokensConfig"}
    return names.get(peft_type, f"{method_name(peft_type)}Config")


def _a(name: str) -> str:
    """``an OFT``, ``a PROMPT_TUNING`` (PEFT types are read letter by letter or as words)."""
    return ("an " if name[:1] in "AEIOF" or name.startswith(("LN", "X")) else "a ") + name


def check_method(config: Mapping[str, Any], where: Path | str) -> None:
    """Refuse adapter methods and variants that loraship does not merge (correctly).

    Raises:
        UnsupportedError: With the method named and what to do instead.
    """
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type in _NOT_MERGEABLE:
        raise UnsupportedError(
            f"`{where}` is {_a(peft_type)} adapter: {_NOT_MERGEABLE[peft_type]}.",
            fix=_NOT_MERGEABLE_FIX.get(
                peft_type, "Ship it as an adapter (load it with PEFT on top of the base model) instead of merging it."
            ),
        )
    found = method_of(peft_type)
    why = found.refusal(config) if found is not None else None
    if found is not None and why:
        raise UnsupportedError(
            f"`{where}` is {_a(peft_type)} adapter that loraship does not merge: {why}.",
            fix="Merge it with PEFT itself: PeftModel.from_pretrained(base, adapter).merge_and_unload(), then check "
            "the result with `loraship verify`.",
        )
    if peft_type in _REPLACING or found is not None:
        return
    if peft_type != "LORA":
        known = "a method PEFT can merge, but" if peft_type in _MERGEABLE_ELSEWHERE else "a method"
        why = _MERGEABLE_ELSEWHERE.get(peft_type)
        raise UnsupportedError(
            f"`{where}` is {_a(peft_type) if peft_type else 'a typeless'} adapter: {known} loraship does not merge yet "
            f"(it merges {supported_methods()})." + (f" {why[0].upper()}{why[1:]}." if why else ""),
            fix="Merge it with PEFT itself: PeftModel.from_pretrained(base, adapter).merge_and_unload(), then check "
            "the result with `loraship verify`.",
        )
    variants = [name for key, name in _VARIANT_FIELDS.items() if config.get(key)]
    init = config.get("init_lora_weights")
    if init == "mica":
        variants.append("MiCA")
    if variants:
        raise UnsupportedError(
            f"`{where}` uses the LoRA variant {', '.join(variants)}, whose merge loraship does not support.",
            fix="Merge it with PEFT itself: PeftModel.from_pretrained(base, adapter).merge_and_unload().",
        )
    # Saved converted (path_initial_model_for_weight_conversion), PEFT writes init_lora_weights=True:
    # only an adapter that still names the base-rewriting init needs the rewritten base.
    if isinstance(init, str) and init.lower().startswith((*_BASE_REWRITING_INITS, "lora_ga")):
        method = "LoRA-GA" if init.lower() == "lora_ga" else str(init)
        raise UnsupportedError(
            f"`{where}` was initialised with {method}, which rewrites the base weights at the start of "
            "training: the adapter only fits that rewritten base, and merging it into the original base "
            "would produce a wrong model.",
            fix="Save the adapter converted to a plain LoRA: model.save_pretrained(out, "
            "path_initial_model_for_weight_conversion=<initial adapter>) (see PEFT's docs for "
            f"{method}), then merge that.",
        )
    if config.get("layer_replication"):
        raise UnsupportedError(
            f"`{where}` uses layer_replication: replicated layers share base weights, so a merged "
            "checkpoint cannot hold a different delta per copy (PEFT 0.21 merges it silently and wrongly).",
            fix="Keep this adapter unmerged, or train without layer_replication.",
        )


# --------------------------------------------------------------------------- parsing


def parse_adapter(
    config: Mapping[str, Any],
    tensors: Mapping[str, TensorInfo],
    *,
    folder: Path,
    param_order: Callable[[str], Sequence[str]] | None = None,
) -> AdapterSpec:
    """Group an adapter's tensors by module and compute each module's scale. Pure.

    Raises:
        AdapterError: Tensor names are not PEFT's, or a module lacks half of its LoRA pair.
        UnsupportedError: The config asks for something loraship does not merge.
    """
    check_method(config, folder)
    peft_type = str(config.get("peft_type") or "LORA").upper()
    method = method_of(peft_type)
    # Tensors the method keeps once for the whole model (base_model.vera_A): every module of it gets them.
    shared = {k: info for k, info in tensors.items() if method is not None and shared_role(method, k)}
    not_peft = [k for k in tensors if not k.startswith(PREFIX) and k not in shared]
    if not_peft:
        raise AdapterError(
            f"`{folder}` does not look like a PEFT LoRA adapter: {len(not_peft)} tensor name(s) do not "
            f"start with `{PREFIX}`, e.g. `{not_peft[0]}`.",
            fix="Save the adapter with PEFT (PeftModel.save_pretrained); adapters in other formats "
            "(kohya, diffusers) must be converted to PEFT first.",
        )
    use_rslora = bool(config.get("use_rslora"))
    use_dora = bool(config.get("use_dora"))
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    # LoRA's (another method may save them as null: SuperTuning without its LoRA)
    lora_alpha = float(config["lora_alpha"] if config.get("lora_alpha") is not None else 8)
    config_r = int(config["r"] if config.get("r") is not None else 8)
    modules_to_save = list(config.get("modules_to_save") or [])
    bias_mode = str(config.get("bias") or "none")
    target_parameters = list(config.get("target_parameters") or [])
    ensure_tying = bool(config.get("ensure_weight_tying"))

    suffixes = _LORA_SUFFIXES if peft_type == "LORA" else _OTHER_SUFFIXES.get(peft_type, ())
    method_parts: dict[str, dict[str, TensorInfo]] = {}
    parts: dict[str, dict[str, TensorInfo]] = {}
    replacements: list[Replacement] = []
    token_tensors: list[tuple[str, TensorInfo]] = []
    ignored: dict[str, str] = {}
    unexplained: list[str] = []
    for key, info in tensors.items():
        if key in shared:
            continue
        name = key[len(PREFIX) :]
        role = _method_role(method, name)
        if method is not None and role is not None:
            method_parts.setdefault(name[: -len(role) - 1], {})[role] = info
            continue
        if peft_type == "LN_TUNING" and ".ln_tuning_layers." in name:
            module, _, param = name.partition(".ln_tuning_layers.")
            replacements.append(Replacement(module, param, info, "ln_tuning"))
            continue
        for suffix, role in suffixes:
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                if role == "tokens":
                    token_tensors.append((module, info))
                else:
                    parts.setdefault(module, {})[role] = info
                break
        else:
            module, _, param = name.rpartition(".")
            if module.endswith(".base_layer"):
                replacements.append(Replacement(module[: -len(".base_layer")], param, info, "saved_base_layer"))
            elif module.endswith(".original_module"):
                ignored[key] = "PEFT's copy of the original module, kept unchanged"
            elif module.endswith(".modules_to_save"):
                owner = module[: -len(".modules_to_save")]
                if PREFIX + owner + "." + param in tensors:
                    ignored[key] = f"duplicate of `{PREFIX}{owner}.{param}`"
                else:
                    replacements.append(Replacement(owner, param, info, "modules_to_save"))
            elif _matches_module(module, modules_to_save):
                replacements.append(Replacement(module, param, info, "modules_to_save"))
            elif param == "bias" and bias_mode != "none":  # "all", or "<method>_only" (lora_only, hra_only...)
                replacements.append(Replacement(module, param, info, "bias"))
            elif ensure_tying and modules_to_save:
                # PEFT also saves the trained copy of the module tied to one in modules_to_save; where it
                # lands (and that it is the tied one) is checked against PEFT when the merge is planned.
                replacements.append(Replacement(module, param, info, "modules_to_save"))
            else:
                unexplained.append(key)
    if unexplained:
        raise AdapterError(
            f"`{folder}` holds {len(unexplained)} tensor(s) that are neither {method_name(peft_type)} weights nor "
            f"covered by modules_to_save or bias in {CONFIG_NAME}: "
            + ", ".join(f"`{k}`" for k in unexplained[:10])
            + (" ..." if len(unexplained) > 10 else "")
            + ".",
            fix=f"Check that {CONFIG_NAME} belongs to these weights (modules_to_save, bias), or save the "
            "adapter again with PEFT.",
        )

    lora_modules: list[LoraModule] = []
    for module, roles in parts.items():
        lora_modules.extend(
            _lora_module(
                module, roles, folder=folder, config_r=config_r, lora_alpha=lora_alpha,
                rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=use_rslora,
                use_dora=use_dora, target_parameters=target_parameters, param_order=param_order,
            )
        )  # fmt: skip
    _check_layers(config, lora_modules, folder)
    method_modules = (
        tuple(method.module(m, {**roles, **shared}, config, folder) for m, roles in method_parts.items())
        if method
        else ()
    )
    token_updates = [_token_update(module, info, config, folder) for module, info in token_tensors]
    return AdapterSpec(
        folder=folder,
        config=dict(config),
        tensors=dict(tensors),
        lora_modules=tuple(lora_modules),
        replacements=tuple(replacements),
        token_updates=tuple(token_updates),
        ignored=ignored,
        method_modules=method_modules,
    )


#: Tensor names of the replacing methods: trained token rows (the rest of a LoRA's are in _LORA_SUFFIXES).
_OTHER_SUFFIXES: dict[str, tuple[tuple[str, str], ...]] = {"TRAINABLE_TOKENS": ((".trainable_tokens_delta", "tokens"),)}


def _method_role(method: Any, name: str) -> str | None:
    """The role (``hada_w1_a``) an adapter tensor named ``<module>.<role>`` has in its method, if any."""
    if method is None:
        return None
    return next((role for role in method.roles if name.endswith("." + role)), None)


def _lora_module(
    module: str,
    roles: Mapping[str, TensorInfo],
    *,
    folder: Path,
    config_r: int,
    lora_alpha: float,
    rank_pattern: Mapping[str, int],
    alpha_pattern: Mapping[str, float],
    use_rslora: bool,
    use_dora: bool,
    target_parameters: Sequence[str],
    param_order: Callable[[str], Sequence[str]] | None,
) -> list[LoraModule]:
    if "A" not in roles or "B" not in roles:
        have = ", ".join(sorted(r for r in roles))
        raise AdapterError(
            f"`{folder}`: module `{module}` has {have} but not both lora_A and lora_B.",
            fix="The adapter file is incomplete: save it again with PEFT.",
        )
    a, b = roles["A"], roles["B"]
    layer: Literal["linear", "embedding"] = "embedding" if a.name.endswith("lora_embedding_A") else "linear"
    if use_dora and "magnitude" not in roles:
        raise AdapterError(
            f"`{folder}`: use_dora is set but module `{module}` has no lora_magnitude_vector.",
            fix="The adapter file is incomplete: save it again with PEFT.",
        )
    pattern_name = module
    param = "weight"
    wrapped = False
    if target_parameters:
        # PEFT wraps the module once per targeted parameter, in the order the module registers its
        # parameters (not the order of target_parameters, which PEFT saves from a set): the first
        # one's wrapper is the innermost, reached through one `.base_layer` per later one.
        depth = 0
        while pattern_name.endswith(".base_layer"):
            pattern_name = pattern_name[: -len(".base_layer")]
            depth += 1
        own = _own_parameters(pattern_name, target_parameters, param_order, folder)
        matching = list(dict.fromkeys(
            p.rpartition(".")[2] for p in target_parameters if _matches_parameter(pattern_name, p, own)))  # fmt: skip
        if len(matching) > 1:
            matching = _registration_order(matching, pattern_name, param_order, folder)
        if matching:
            if depth >= len(matching):
                raise AdapterError(
                    f"`{folder}`: `{module}` is nested deeper than target_parameters explains.",
                    fix="Save the adapter again with PEFT.",
                )
            param = matching[len(matching) - 1 - depth]
            wrapped = True
        else:
            pattern_name = module
    # PEFT looks a wrapped parameter's rank and alpha up by `<module>.<param>` (its current_key).
    key_name = f"{pattern_name}.{param}" if wrapped else pattern_name
    r_key = pattern_key(rank_pattern, key_name)
    alpha_key = pattern_key(alpha_pattern, key_name)
    alpha = float(alpha_pattern[alpha_key]) if alpha_key is not None else lora_alpha
    configured_rank = int(rank_pattern[r_key]) if r_key is not None else config_r
    experts: int | None = None
    if wrapped:
        # lora_A of a targeted parameter holds r rows per expert.
        rank = configured_rank
        if rank <= 0 or not a.shape or a.shape[0] % rank:
            raise AdapterError(
                f"`{folder}`: `{a.name}` has {a.shape[0] if a.shape else 0} rows, not a multiple of r={rank}.",
                fix=f"Restore {CONFIG_NAME} as PEFT saved it with this adapter.",
            )
        experts = a.shape[0] // rank
    else:
        rank = a.shape[0] if a.shape else 0
    if rank <= 0:
        raise AdapterError(f"`{folder}`: module `{module}` has rank 0.", fix="Save the adapter again with PEFT.")
    scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    return [
        LoraModule(
            module=pattern_name,
            layer=layer,
            a=a,
            b=b,
            rank=rank,
            alpha=alpha,
            scale=scale,
            magnitude=roles.get("magnitude"),
            bias=roles.get("B_bias"),
            param=param,
            experts=experts,
            wraps_parameter=wrapped,
        )
    ]


def _token_update(module: str, info: TensorInfo, config: Mapping[str, Any], folder: Path) -> TokenUpdate:
    standalone = str(config.get("peft_type") or "").upper() == "TRAINABLE_TOKENS"
    field_name = "token_indices" if standalone else "trainable_token_indices"
    spec = config.get(field_name)
    indices: Sequence[int] | None = None
    if isinstance(spec, list):
        indices = spec
    elif isinstance(spec, dict):
        key = pattern_key({k: 0 for k in spec}, module)
        indices = spec.get(key) if key is not None else None
    if indices is None:
        raise AdapterError(
            f"`{folder}` holds trainable-token rows for `{module}` but {CONFIG_NAME} gives no {field_name} for it.",
            fix=f"Restore {CONFIG_NAME} as PEFT saved it with this adapter.",
        )
    if not info.shape or info.shape[0] != len(indices):
        raise AdapterError(
            f"`{folder}`: `{info.name}` has {info.shape[0] if info.shape else 0} rows but "
            f"{field_name} lists {len(indices)} tokens for `{module}`.",
            fix=f"Restore {CONFIG_NAME} as PEFT saved it with this adapter.",
        )
    return TokenUpdate(module=module, tensor=info, indices=tuple(int(i) for i in indices))


def _matches_module(module: str, names: Sequence[str]) -> bool:
    """PEFT's modules_to_save matching: the module, or a module containing it, ends with a name."""
    pieces = module.split(".")
    prefixes = [".".join(pieces[: i + 1]) for i in range(len(pieces))]
    return any(p.endswith(n) for p in prefixes for n in names)


def _registration_order(
    names: list[str], module: str, param_order: Callable[[str], Sequence[str]] | None, folder: Path
) -> list[str]:
    order = list(param_order(module)) if param_order is not None else []
    if not set(names) <= set(order):
        raise UnsupportedError(
            f"`{folder}` targets several parameters of `{module}` ({', '.join(names)}); PEFT nests their LoRAs in "
            "the order the model registers its parameters, and loraship could not build the model to read it.",
            fix="Merge with PEFT (merge_and_unload) and check the result with `loraship verify`.",
        )
    return sorted(names, key=order.index)


def _own_parameters(
    module: str, targets: Sequence[str], param_order: Callable[[str], Sequence[str]] | None, folder: Path
) -> frozenset[str] | None:
    """The parameters ``module`` itself registers, where a bare target needs them (None otherwise).

    A target without a dot (``gate_up_proj``, as PEFT's ``all-linear`` saves the experts of a fused MoE) names
    a parameter of whichever module has one by that name, so which modules it wraps depends on the model.

    Raises:
        UnsupportedError: A target is bare and the model could not be built to read its parameters.
    """
    bare = sorted(t for t in targets if "." not in t)
    if not bare:
        return None
    if param_order is None:
        raise UnsupportedError(
            f"`{folder}` targets parameters by their bare name ({', '.join(bare)}); which modules own them depends on "
            "the model, and loraship could not build the model to read it.",
            fix="Merge with PEFT (merge_and_unload) and check the result with `loraship verify`.",
        )
    return frozenset(param_order(module))


def _matches_parameter(module: str, target: str, own: frozenset[str] | None = None) -> bool:
    """PEFT's matching of ``target_parameters``: ``<module>.<param>`` is the target or ends with ``.<target>``,
    for a parameter the module registers itself (checked where ``own`` is known)."""
    param = target.rpartition(".")[2]
    if own is not None and param not in own:
        return False
    key = f"{module}.{param}"
    return key == target or key.endswith("." + target)


def _check_layers(config: Mapping[str, Any], modules: Sequence[LoraModule], folder: Path) -> None:
    """PEFT applies ``layers_to_transform`` (with a list of target_modules) to the module's first layer
    number: a LoRA outside the listed layers would not be loaded by PEFT, so the config does not fit."""
    wanted = config.get("layers_to_transform")
    if wanted is None or wanted == [] or not isinstance(config.get("target_modules"), list) or not modules:
        return
    layers = {wanted} if isinstance(wanted, int) else set(wanted)
    patterns = config.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
    found: dict[str, int | None] = {}
    for m in modules:
        if patterns:
            hit = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", m.module) for p in patterns)), None)
        else:
            hit = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", m.module)
        found[m.module] = int(hit.group("idx")) if hit else None
    outside = {name: i for name, i in found.items() if i not in layers}
    if not outside:
        return
    shown = json.dumps(wanted)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    held = sorted({i for i in found.values() if i is not None})
    held_text = ", ".join(map(str, held[:10])) + (" ..." if len(held) > 10 else "")
    where = folder / CONFIG_NAME
    if len(outside) == len(found):
        raise AdapterError(
            f"`{where}` sets `layers_to_transform` to {shown}, which names no layer the adapter holds LoRA weights "
            f"for (" + (f"layers {held_text}" if held else "none has a layer number") + "): PEFT would target no "
            "layer and load none of them.",
            fix=f"Restore {CONFIG_NAME} as PEFT saved it with these weights (layers_to_transform, layers_pattern).",
        )
    name, index = next(iter(outside.items()))
    raise AdapterError(
        f"`{where}` sets `layers_to_transform` to {shown}, but the adapter also holds LoRA weights for "
        + (f"layer {index}" if index is not None else "a module without a layer number")
        + f" (`{name}`), which PEFT would leave out.",
        fix=f"Restore {CONFIG_NAME} as PEFT saved it with these weights (layers_to_transform, layers_pattern).",
    )
