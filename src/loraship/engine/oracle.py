"""An independent check of a merge plan's names and tying, with transformers and PEFT themselves.

The planner decides from tensor headers where each adapter tensor lands. A planning mistake there
would check itself if ``verify`` recomputed tensors with the same plan. This module derives the
same facts another way, from the libraries users load the result with: the base model class and
the ``PeftModel`` around it are built on the meta device (no weights read, about a second), and
for every adapter tensor it finds the module PEFT loads it into, the parameter that module
changes, which parameters share that tensor, and the checkpoint tensors transformers loads them
from. It also applies PEFT's own load-time validation (options PEFT refuses, shapes vs ``r``) and
asks transformers which tensors the merged model's class expects. The plan must agree.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraship.engine.adapter import PREFIX, AdapterSpec
from loraship.engine.conversions import FusedParam
from loraship.engine.model_map import ModelMap, ModelMapError, build_meta_model, key_renamer, tied_groups
from loraship.engine.patterns import check_patterns
from loraship.engine.plan import LoraStep, MergePlan, TensorPlan
from loraship.errors import AdapterError, first_line
from loraship.methods.base import method_of

_CONFIG_UPDATES_FOR_CLASS = ("num_labels", "id2label", "label2id", "vocab_size", "tie_word_embeddings")


@dataclass(frozen=True)
class OracleReport:
    """What the independent derivation found.

    Attributes:
        checked: Adapter tensors whose destination was checked.
        disagreements: Each place where the plan and transformers + PEFT differ, in words.
        skipped: Why the check could not run (the model class cannot be built), or None.
    """

    checked: int
    disagreements: tuple[str, ...]
    skipped: str | None = None

    @property
    def agrees(self) -> bool:
        return not self.disagreements


def peft_model_on_meta(
    base_dir: Path, adapter: AdapterSpec, model_map: ModelMap, config_updates: Mapping[str, Any]
) -> tuple[dict[str, Any], Any]:
    """The PeftModel built on the meta device from the adapter's config, and the base model's
    parameters by name (tied aliases included), taken before PEFT wraps any module.

    Raises:
        AdapterError: PEFT refuses the adapter's configuration.
        ModelMapError: The class cannot be built, or PEFT's layers cannot be built on the meta device.
    """
    import torch
    from peft import PeftConfig, get_peft_model
    from peft.utils.error import NoMatchingPeftModuleError

    overrides = {k: v for k, v in config_updates.items() if k in ("num_labels", "id2label", "label2id")}
    if "id2label" in overrides:
        overrides["num_labels"] = len(overrides["id2label"])
    model = build_meta_model(base_dir, model_map.model_class, config_overrides=overrides)
    if "vocab_size" in config_updates and hasattr(model, "resize_token_embeddings"):
        with torch.device("meta"):
            model.resize_token_embeddings(int(config_updates["vocab_size"]), mean_resizing=False)
    try:
        config = PeftConfig.from_peft_type(**_known_fields(adapter.config))
    except (ValueError, TypeError) as e:
        raise AdapterError(
            f"PEFT refuses the configuration of `{adapter.folder}`: {e}",
            fix="PEFT cannot load this adapter either: save it again with a configuration PEFT accepts.",
        ) from e
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = True  # shapes only: no initialisation that rewrites base weights
    config.inference_mode = True
    params = dict(model.named_parameters(remove_duplicate=False))
    where = adapter.folder / "adapter_config.json"
    check_patterns(adapter.config, [n for n, _ in model.named_modules()], where=where)
    try:
        with torch.device("meta"), _meta_safe_layers(), warnings.catch_warnings():
            # LN tuning of an RMSNorm: PEFT warns of a layer type it does not list, and wraps it all the same.
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            peft_model = get_peft_model(model, config)
            if config.peft_type == "ADALORA" and config.rank_pattern is not None:
                # As PeftModel.from_pretrained resizes (AdaLoraModel.resize_modules_by_rank_pattern), shapes
                # only: meta tensors cannot be indexed by the masks, and there are no values to copy.
                for key, mask in config.rank_pattern.items():
                    layer = ".".join(key.split(".")[: -2 if "default" in key else -1])
                    try:
                        target = peft_model.base_model.model.get_submodule(layer)
                        target.update_layer("default", sum(mask), config.lora_alpha, config=config)
                    except AttributeError as e:
                        raise ValueError(f"its rank_pattern names `{key}`, not an AdaLoRA layer: {e}") from e
    except NoMatchingPeftModuleError as e:
        raise AdapterError(
            f"`{where}` targets no module of {type(model).__name__}: {first_line(e)}",
            fix="Restore adapter_config.json as PEFT saved it with these weights (target_modules, "
            "layers_to_transform, layers_pattern).",
        ) from e
    except NotImplementedError as e:  # PEFT's layers run an op with no meta kernel (UniLoRA's bincount)
        raise ModelMapError(
            f"PEFT's {config.peft_type} layers cannot be built on the meta device ({first_line(e)[:120]})"
        ) from e
    except (ValueError, TypeError) as e:  # a targeted module PEFT cannot wrap, an option it refuses
        text = " ".join(str(e).split())
        raise AdapterError(
            f"PEFT refuses the configuration of `{adapter.folder}`: {text if len(text) <= 400 else text[:397] + '...'}",
            fix="PEFT cannot load this adapter either: save it again with a configuration PEFT accepts.",
        ) from e
    return params, peft_model


_PATCHING = threading.Lock()


@contextmanager
def _meta_safe_layers() -> Iterator[None]:
    """While PEFT's layers are built on the meta device, the few layer methods that compute data there (index
    tensors, which have no meta kernels) run on the CPU, or give a meta tensor of the shape they would make: the
    check needs the layers' shapes, not their values. Elsewhere (the CPU, another thread) they run unchanged.

    BOFT: ``block_butterfly_perm`` (PEFT's check of the blocks included) runs on the CPU; ``perm2mat`` (an
    ``(n, n)`` matrix filled one index at a time) gives its shape. SHiRA: ``update_layer`` takes the places of the
    mask's ones (``torch.where``), ``r x (in + out)`` of them; they are meta places of that count.
    """
    import torch
    from peft.tuners.boft.layer import BOFTLayer
    from peft.tuners.shira.layer import ShiraLayer

    def on_meta() -> bool:
        return bool(torch.get_default_device().type == "meta")

    perm, to_matrix, update = BOFTLayer.block_butterfly_perm, BOFTLayer.perm2mat, ShiraLayer.update_layer

    def block_butterfly_perm(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not on_meta():
            return perm(self, *args, **kwargs)
        with torch.device("cpu"):
            return perm(self, *args, **kwargs)

    def perm2mat(self: Any, indices: Any) -> Any:
        return torch.empty((len(indices), len(indices))) if on_meta() else to_matrix(self, indices)

    def update_layer(self: Any, adapter_name: str, mask: Any, r: int, *args: Any, **kwargs: Any) -> Any:
        if mask is None or mask.device.type != "meta":
            return update(self, adapter_name, mask, r, *args, **kwargs)
        done = update(self, adapter_name, None, r, *args, **kwargs)
        places = r * (self.in_features + self.out_features)
        self.shira_indices[adapter_name] = torch.empty((2, places), dtype=torch.int, device="meta")
        return done

    with _PATCHING:
        BOFTLayer.block_butterfly_perm, BOFTLayer.perm2mat = block_butterfly_perm, perm2mat  # type: ignore[method-assign]
        ShiraLayer.update_layer = update_layer  # type: ignore[method-assign]
        try:
            yield
        finally:
            BOFTLayer.block_butterfly_perm, BOFTLayer.perm2mat = perm, to_matrix  # type: ignore[method-assign]
            ShiraLayer.update_layer = update  # type: ignore[method-assign]


def _known_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``config`` its PEFT type's config class has (a newer PEFT may have saved more)."""
    from peft import LoraConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    peft_type = str(config.get("peft_type") or "LORA").upper()
    known = peft_type in PeftType.__members__
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)] if known else LoraConfig
    fields = set(cls.__dataclass_fields__)
    return {k: v for k, v in config.items() if k in fields}


def check_plan(base_dir: Path, adapter: AdapterSpec, plan: MergePlan, model_map: ModelMap | None) -> OracleReport:
    """Derive each adapter tensor's destination with transformers + PEFT and compare with ``plan``.

    Raises:
        AdapterError: PEFT itself refuses the adapter (options it rejects, weights that do not fit ``r``).
    """
    if model_map is None:
        return OracleReport(0, (), skipped="transformers cannot build the model class")
    try:
        params, peft_model = peft_model_on_meta(base_dir, adapter, model_map, plan.config_updates)
    except ModelMapError as e:
        return OracleReport(0, (), skipped=str(e))
    _peft_validation(adapter, peft_model)
    names_of: dict[int, list[str]] = {}
    for name, p in params.items():
        names_of.setdefault(id(p), []).append(name)
    wrappers = _wrappers(peft_model)
    changes = _method_changes(adapter)
    tensors = {t.name: t for t in plan.tensors}
    modules = {n[len(PREFIX) :] for n, _ in peft_model.named_modules() if n.startswith(PREFIX)}
    untargeted: list[str] = []
    problems: list[str] = []
    checked = 0
    model_level: set[str] | None = None  # PEFT's whole-model tensors, read once if the adapter has any
    for key in adapter.tensors:
        landed = plan.accounting.get(key, "")
        if landed.startswith("(ignored"):
            continue
        if not key.startswith(PREFIX):  # kept once for the whole model (VeRA's base_model.vera_A), read by each module
            checked += 1
            model_level = _model_level_tensors(peft_model) if model_level is None else model_level
            if key not in model_level:
                problems.append(f"`{key}`: PEFT keeps no such tensor for the whole model")
            continue
        saved = _per_expert_tensor(key, model_map)
        if saved is not None:  # saved under transformers v4 names: the tensor its module names, as it is stored
            checked += 1
            if landed != saved:
                problems.append(f"`{key}` is a LoRA of the per-expert tensor `{saved}`; the plan puts it in "
                                f"`{landed or 'nowhere'}`")  # fmt: skip
            continue
        found = _destination(key, wrappers, params, changes)
        if found is None:
            module = _adapter_module(key, adapter)
            if module is not None and module in modules and not _is_lora_layer(wrappers.get(module)):
                untargeted.append(module)  # the config does not target a module the weights are for
                continue
            problems.append(f"`{key}`: PEFT loads it into no module of {model_map.model_class}")
            continue
        module, param, param_obj, shared_change = found
        checked += 1
        own = f"{module}.{param}" if module else param
        group = names_of.get(id(param_obj), [own])
        stored = {model_map.stored[n] for n in group if n in model_map.stored}
        expected = {model_map.saved_as.get(own, own)}
        if shared_change or len(group) == 1:
            expected |= stored
        plan_tensor = tensors.get(landed)
        fused = model_map.fused.get(own)
        if fused is not None:  # fused by transformers on load: the delta lands in every per-expert tensor
            problems.extend(_fused_problems(key, fused, landed, tensors))
            continue
        cut = model_map.pieces.get(own)
        if cut is not None:  # cut from or joined of stored tensors on load: the delta reaches each of them
            problems.extend(_piece_problems(key, own, cut, tensors))
            continue
        if landed not in expected:
            where = f"`{landed}`" if landed else "nowhere"
            problems.append(
                f"`{key}` changes `{own}`"
                + (f" (shared with {', '.join(f'`{n}`' for n in group if n != own)})" if len(group) > 1 else "")
                + f": transformers + PEFT put it in {' or '.join(f'`{e}`' for e in sorted(expected))}, "
                f"the plan in {where}"
            )
        elif plan_tensor is not None:
            source = plan_tensor.source.name if plan_tensor.source is not None else None
            if source is not None and plan_tensor.scale is not None:  # MXFP4 blocks stand for the parameter
                source = source.removesuffix("_blocks")
            if (source not in stored) if stored else (source is not None):
                problems.append(
                    f"`{landed}` starts from `{source}` in the plan, but `{own}` is loaded from "
                    + (" or ".join(f"`{s}`" for s in sorted(stored)) if stored else "no base tensor (it is new)")
                )
    if untargeted:
        first = list(dict.fromkeys(untargeted))
        raise AdapterError(
            f"`{adapter.folder / 'adapter_config.json'}` does not target `{first[0]}`"
            + (f" (nor {len(first) - 1} more module(s))" if len(first) > 1 else "")
            + ", but the adapter holds LoRA weights for it: PEFT would leave them out when loading the adapter.",
            fix="Restore adapter_config.json as PEFT saved it with these weights (target_modules, "
            "layers_to_transform, modules_to_save, exclude_modules).",
        )
    problems.extend(_expected_keys(base_dir, plan, model_map))
    return OracleReport(checked, tuple(problems))


def _model_level_tensors(peft_model: Any) -> set[str]:
    """The saved names of the tensors PEFT keeps once for the whole model (not in a module of it)."""
    from peft import get_peft_model_state_dict

    return {k for k in get_peft_model_state_dict(peft_model) if not k.startswith(PREFIX)}


def _adapter_module(key: str, adapter: AdapterSpec) -> str | None:
    """The module an adapter tensor of a LoRA or another method's layer belongs to (None for other tensors)."""
    if ".lora_" in key:
        return key[len(PREFIX) :].partition(".lora_")[0]
    return next((m.module for m in adapter.method_modules for _, info in m.tensors if info.name == key), None)


def _is_lora_layer(module: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _per_expert_tensor(key: str, model_map: ModelMap) -> str | None:
    """For a LoRA tensor an adapter saved under transformers v4 names, the checkpoint tensor its module names,
    when transformers fuses that tensor (per-expert layers) or renames it (Mixtral's router) on load."""
    module = key[len(PREFIX) :].partition(".lora_")[0]
    name = f"{module}.weight"
    v4 = name in model_map.fused_sources or name in model_map.renamed_sources
    return name if ".lora_" in key and v4 else None


def _piece_problems(
    key: str, own: str, cut: tuple[tuple[str, Any], ...], tensors: Mapping[str, TensorPlan]
) -> list[str]:
    """A LoRA on a parameter transformers cuts from (or joins of) stored tensors must reach each of them."""
    missing = [
        stored for stored, _ in cut
        if not any(isinstance(s, LoraStep) and s.piece is not None and key in (s.module.a.name, s.module.b.name)
                   for s in (tensors[stored].steps if stored in tensors else ()))
    ]  # fmt: skip
    if missing:
        return [f"`{key}` changes `{own}`, built on load from {', '.join(f'`{k}`' for k, _ in cut)}; the plan "
                f"leaves `{missing[0]}` out"]  # fmt: skip
    return []


def _fused_problems(key: str, fused: FusedParam, landed: str, tensors: Mapping[str, TensorPlan]) -> list[str]:
    """A LoRA on a fused expert parameter must reach each of its per-expert tensors, each with its part."""
    sources = [k for keys in fused.sources for k in keys]
    if landed not in sources:
        return [f"`{key}` changes `{fused.param}`, built from {len(sources)} per-expert tensors; the plan puts it in "
                f"`{landed or 'nowhere'}`"]  # fmt: skip
    missing = [
        k for k in sources
        if not any(isinstance(s, LoraStep) and key in (s.module.a.name, s.module.b.name)
                   for s in (tensors[k].steps if k in tensors else ()))
    ]  # fmt: skip
    if missing:
        return [f"`{key}` changes `{fused.param}`, but the plan leaves {len(missing)} of its per-expert tensors "
                f"unchanged (e.g. `{missing[0]}`)"]  # fmt: skip
    return []


def _peft_validation(adapter: AdapterSpec, peft_model: Any) -> None:
    """PEFT's load-time checks: every saved tensor has the shape the config gives it."""
    from peft import get_peft_model_state_dict

    expected = get_peft_model_state_dict(peft_model)
    wrong = [
        f"`{k}` is {list(info.shape)}, PEFT expects {list(expected[k].shape)}"
        for k, info in adapter.tensors.items()
        if k in expected and tuple(expected[k].shape) != tuple(info.shape)
    ]
    if wrong:
        raise AdapterError(
            f"`{adapter.folder}` does not fit its own adapter_config.json (PEFT refuses to load it): "
            + "; ".join(wrong[:5])
            + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
            + ".",
            fix="Restore adapter_config.json as PEFT saved it with these weights (r, rank_pattern, target_modules).",
        )


def _wrappers(peft_model: Any) -> dict[str, Any]:
    """Module name (without PEFT's prefix) -> each PEFT layer or auxiliary wrapper."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    out: dict[str, Any] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and name.startswith(PREFIX):
            out[name[len(PREFIX) :]] = module
    return out


def _method_changes(adapter: AdapterSpec) -> dict[str, str]:
    """Each tensor of another method's module -> the base parameter the method says it changes first (the weight;
    BEFT's the bias): the one the plan accounts it to."""
    out: dict[str, str] = {}
    for m in adapter.method_modules:
        method = method_of(m.method)
        if method is not None:
            out.update(dict.fromkeys((info.name for _, info in m.tensors), method.params(m)[0][0]))
    return out


def _destination(
    key: str, wrappers: Mapping[str, Any], params: Mapping[str, Any], changes: Mapping[str, str]
) -> tuple[str, str, Any, bool] | None:
    """The module an adapter tensor is loaded into, the base parameter it changes, and whether the
    change is shared by every module tied to that parameter in PEFT's unmerged model. ``changes``: the base
    parameter each tensor of another method changes (:func:`_method_changes`; the weight if not named)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    path = key[len(PREFIX) :]
    owner = max((n for n in wrappers if path.startswith(n + ".")), key=len, default=None)
    if owner is None:  # a trained base parameter saved as it is (bias="all"): loaded under its own name
        module, _, param = path.rpartition(".")
        return (module, param, params[path], False) if path in params else None
    layer = wrappers[owner]
    rest = path[len(owner) + 1 :]
    module = owner
    while module.endswith(".base_layer"):  # nested wrappers (target_parameters): the outermost names it
        module = module[: -len(".base_layer")]
    if isinstance(layer, ModulesToSaveWrapper):  # the copy replaces the module's own parameter
        inner, _, param = f"{module}.{rest}".rpartition(".")
        try:
            return inner, param, layer.original_module.get_parameter(rest), False
        except AttributeError:  # not a parameter of the module (a LoRA of a module PEFT saves whole)
            return None
    if isinstance(layer, TrainableTokensWrapper):
        return module, "weight", layer.get_base_layer().weight, True
    assert isinstance(layer, BaseTunerLayer)
    base = layer.get_base_layer()
    while isinstance(base, BaseTunerLayer):
        base = base.get_base_layer()
    if rest.startswith("trainable_tokens"):  # rows of the embedding, in every layer tied to it
        return module.removesuffix(".token_adapter"), "weight", base.weight, True
    if rest.startswith("base_layer."):  # a saved base layer is loaded into the shared parameter itself
        param = rest.rpartition(".")[2]
        return module, param, getattr(base, param), True
    if rest.startswith("ln_tuning_layers."):  # LN tuning: the trained copy of the norm replaces it
        param = rest.rpartition(".")[2]
        return module, param, getattr(base, param), False
    own = (*getattr(layer, "adapter_layer_names", ()), *getattr(layer, "other_param_names", ()))
    first = rest.partition(".")[0]
    if (first in own or any(first.startswith(n + "_") for n in own)) and not rest.startswith("lora_"):
        # another method's tensor (or its layer's copy of a shared one, RandLoRA's; or a saved form of it, VB-LoRA's
        # <logits>_topk_indices): it changes the parameter its method names
        param = changes.get(key, "weight")
        return module, param, getattr(base, param, None), False
    if "." not in rest and not rest.startswith("lora_"):  # a trained parameter of the layer (bias="all")
        return module, rest, getattr(base, rest), False
    param = "bias" if rest == "lora_B.bias" else str(getattr(layer, "parameter_name", None) or "weight")
    lora_a = getattr(layer, "lora_A", None) or getattr(layer, "lora_embedding_A", None)
    shared = _lora_shared(layer, lora_a, wrappers)
    return module, param, getattr(base, param), shared


def _lora_shared(layer: Any, lora_a: Any, wrappers: Mapping[str, Any]) -> bool:
    """``ensure_weight_tying``: another layer holds this layer's very LoRA parameters."""
    if lora_a is None:
        return False
    mine = {id(p) for p in lora_a.parameters()}
    for other in wrappers.values():
        if other is layer:
            continue
        theirs = getattr(other, "lora_A", None) or getattr(other, "lora_embedding_A", None)
        if theirs is not None and mine & {id(p) for p in theirs.parameters()}:
            return True
    return False


def _expected_keys(base_dir: Path, plan: MergePlan, model_map: ModelMap) -> list[str]:
    """Parameters the merged model's class would find no tensor for (initialised randomly on load)."""
    overrides = {k: v for k, v in plan.config_updates.items() if k in _CONFIG_UPDATES_FOR_CLASS}
    if "id2label" in overrides:
        overrides["num_labels"] = len(overrides["id2label"])
    archs = plan.config_updates.get("architectures")
    class_name = str(archs[0]) if isinstance(archs, list) and archs else model_map.model_class
    try:
        merged = build_meta_model(base_dir, class_name, config_overrides=overrides)
    except ModelMapError as e:
        return [f"the merged model's class cannot be built: {e}"]
    to_model = key_renamer(merged)
    provided = {to_model(t.name).removesuffix("#converted") for t in plan.tensors}
    names = {t.name for t in plan.tensors}
    provided |= {p for p, cut in model_map.pieces.items() if all(k in names for k, _ in cut)}
    # The base's own class computes some parameters instead of loading them (Marian's sinusoidal positions, not
    # trainable), and ties some at load (a head to the embeddings): the base stores neither, nor need the merge.
    same_class = class_name == model_map.model_class
    computed = {n for n, p in merged.named_parameters() if not p.requires_grad}
    missing = []
    for group in [*tied_groups(merged), *((n,) for n, _ in merged.named_parameters())]:
        tied = {m for n in group for m in model_map.group_of(n)} if same_class else set(group)  # ties made at load
        if provided & tied:
            continue
        if same_class and set(group) <= computed and not any(n in model_map.stored for n in group):
            continue
        missing.append(group[0])
    missing = list(dict.fromkeys(missing))
    if not missing:
        return []
    shown = ", ".join(f"`{n}`" for n in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    return [f"{class_name} expects {shown}, which the merged checkpoint does not hold (it would load random values)"]
