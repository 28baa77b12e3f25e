"""What transformers knows about a model that a checkpoint's headers cannot tell.

Which checkpoint tensor each model parameter is loaded from (transformers' own key renames,
``base_model_prefix`` handling and conversion mapping), which parameters share one tensor (tying,
taken from the parameters the model actually shares, not from names), what untying through
``tie_word_embeddings=false`` would split, and which parameters transformers keeps in float32.

It is read from the model class built on PyTorch's ``meta`` device (no memory, no weights), once,
before the merge; the planner (:mod:`loraship.engine.plan`) takes the result as a value and stays pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from loraship.engine.conversions import ConversionRules, FusedParam, Piece, fused_params, pieces

#: PEFT task types and the transformers Auto class PeftModel uses for each (PEFT's own mapping).
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


@dataclass(frozen=True)
class ModelMap:
    """Names, tying and dtypes of the model class the adapter was trained on, as transformers has them.

    Attributes:
        model_class: The transformers class (``LlamaForCausalLM``).
        prefix: Its ``base_model_prefix``.
        params: Every parameter name of the model, tied aliases included, in the model's order.
        stored: Parameter name -> the checkpoint tensor it is loaded from (tied aliases included).
        saved_as: Parameter name -> the name a tensor of its own would have in this checkpoint's naming.
        fused: Parameter name -> how transformers builds it from per-expert checkpoint tensors (MoE
            experts fused on load): no single stored tensor.
        groups: Parameters sharing one tensor (tied), each group in the model's order.
        untied_groups: The same groups with ``tie_word_embeddings=false``.
        untie_by_config: Writing ``tie_word_embeddings=false`` changes nothing else transformers reads
            from the config (for T5 it also turns off the decoder's output scaling).
        keep_fp32: Parameter names transformers keeps in float32, by checkpoint dtype code.
        input_embedding: Module name of the input embedding.
        output_embedding: Module name of the output embedding, if any.
        transposed_experts: Expert modules whose 3-D parameters are stored (experts, in, out).
        loaded: What the class loads from a checkpoint: its parameters and persistent buffers.
        pieces: Parameter name -> the stored tensors transformers cuts it from or joins it of (:class:`Piece`).
        uncut: Parameter name -> how transformers builds it from a stored tensor, for conversions loraship
            cannot carry a LoRA delta back through.
    """

    model_class: str
    prefix: str
    params: tuple[str, ...]
    stored: Mapping[str, str]
    saved_as: Mapping[str, str]
    fused: Mapping[str, FusedParam] = field(default_factory=dict)
    groups: tuple[tuple[str, ...], ...] = ()
    untied_groups: tuple[tuple[str, ...], ...] = ()
    untie_by_config: bool = True
    keep_fp32: Mapping[str, frozenset[str]] = field(default_factory=dict)
    input_embedding: str | None = None
    output_embedding: str | None = None
    transposed_experts: frozenset[str] = frozenset()
    loaded: frozenset[str] = frozenset()
    pieces: Mapping[str, tuple[tuple[str, Piece], ...]] = field(default_factory=dict)
    uncut: Mapping[str, str] = field(default_factory=dict)

    def param_order(self, module: str) -> tuple[str, ...]:
        """The short names of ``module``'s own parameters in registration order (PEFT nests wrappers
        of several ``target_parameters`` of one module in this order)."""
        owned = self._owned
        owner = module if module in owned else next(
            (o for o in sorted(owned) if o.endswith("." + module) or module.endswith("." + o)), None)  # fmt: skip
        return owned[owner] if owner else ()

    @cached_property
    def _owned(self) -> dict[str, tuple[str, ...]]:
        """Module -> the short names of its own parameters, in registration order (built once: an all-linear MoE
        adapter asks for every one of its modules)."""
        owned: dict[str, list[str]] = {}
        for p in self.params:
            owner, _, short = p.rpartition(".")
            owned.setdefault(owner, []).append(short)
        return {owner: tuple(shorts) for owner, shorts in owned.items()}

    def unloaded(self, names: Iterable[str]) -> list[str]:
        """The checkpoint tensors among ``names`` this class does not load (another head's: unexpected keys)."""
        if not self.loaded:
            return []
        by_key: dict[str, set[str]] = {}
        for param, key in self.stored.items():
            by_key.setdefault(key, set()).add(param)
        fused = self.fused_sources
        return [n for n in names if n in by_key and n not in fused and not by_key[n] & self.loaded]

    @property
    def renamed_sources(self) -> frozenset[str]:
        """Checkpoint tensors transformers loads under another name (Mixtral's ``block_sparse_moe.gate.weight``
        into ``mlp.gate.weight``): the names a transformers v4 adapter still uses."""
        return frozenset(saved for param, saved in self.stored.items() if saved != param and saved not in self.stored)

    @property
    def fused_sources(self) -> frozenset[str]:
        """Checkpoint tensors transformers fuses into some parameter (per-expert tensors)."""
        return frozenset(k for f in self.fused.values() for keys in f.sources for k in keys)

    def group_of(self, param: str) -> tuple[str, ...]:
        """The tied group holding ``param`` (just ``param`` when it is not tied)."""
        for group in self.groups:
            if param in group:
                return group
        return (param,)

    def untied_group_of(self, param: str) -> tuple[str, ...]:
        for group in self.untied_groups:
            if param in group:
                return group
        return (param,)


class ModelMapError(Exception):
    """The model class could not be built: the reason, for the plan's notes."""


def model_class_name(config: Mapping[str, Any], adapter_config: Mapping[str, Any]) -> str | None:
    """The class PEFT wrapped: the adapter's recorded class, its task's Auto class, or config.json's."""
    mapping = adapter_config.get("auto_mapping")
    if isinstance(mapping, dict) and mapping.get("base_model_class"):
        return str(mapping["base_model_class"])
    task = str(adapter_config.get("task_type") or "")
    if task in TASK_AUTO_CLASSES:
        return TASK_AUTO_CLASSES[task]
    archs = config.get("architectures")
    return str(archs[0]) if isinstance(archs, list) and archs else None


def build_meta_model(folder: Path, class_name: str | None, *, config_overrides: Mapping[str, Any] | None = None) -> Any:
    """The model class built on the meta device from ``folder``'s config.json (no weights read).

    Raises:
        ModelMapError: transformers has no such class, or building it failed.
    """
    import json

    import torch
    import transformers

    from loraship.engine.repo_files import update_config

    try:  # config.json as loraship would write it, read the way from_pretrained reads a file
        data = update_config(json.loads((folder / "config.json").read_text()), config_overrides or {})
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except Exception as e:
        raise ModelMapError(f"transformers cannot read config.json ({type(e).__name__}: {e})") from e
    if not class_name or not hasattr(transformers, class_name):
        raise ModelMapError(f"transformers has no model class {class_name or '(none named)'}")
    cls = getattr(transformers, class_name)
    try:
        with torch.device("meta"):
            return cls.from_config(config) if class_name.startswith("Auto") else cls(config)
    except Exception as e:
        raise ModelMapError(f"could not build {class_name} ({type(e).__name__}: {e})") from e


def inspect_model(folder: Path, checkpoint_names: Iterable[str], adapter_config: Mapping[str, Any]) -> ModelMap:
    """Read names, tying and dtypes of the base's model class from transformers (meta device).

    Raises:
        ModelMapError: The class cannot be built (e.g. it needs remote code).
    """
    import json

    config = json.loads((folder / "config.json").read_text())
    class_name = model_class_name(config, adapter_config)
    model = build_meta_model(folder, class_name)
    names = list(checkpoint_names)
    shapes = (
        {k: tuple(getattr(v, "shape", ())) for k, v in checkpoint_names.items()}
        if isinstance(checkpoint_names, Mapping) else {}
    )  # fmt: skip
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    rules = ConversionRules.of(model)
    to_model = key_renamer(model, rules)
    stored: dict[str, str] = {}
    for key in names:
        target = to_model(key)
        if target.endswith("#converted"):
            continue
        if target in stored and stored[target] != key:
            continue  # two checkpoint keys for one parameter: the first wins, as transformers' sorted load
        stored[target] = key
    groups = tied_groups(model)
    for group in groups:  # tied aliases load from whichever member the checkpoint stores
        keys = [stored[p] for p in group if p in stored]
        for p in group:
            if p not in stored and keys:
                stored[p] = keys[0]
    model_of = {key: to_model(key) for key in names}
    saved_as = {
        p: stored[p] if model_of.get(stored.get(p, "")) == p else _checkpoint_name(p, to_model, model_of)
        for p in params
    }
    cut, uncut = pieces(rules, shapes)
    untied, by_config = _untied(folder, class_name, model, groups)
    in_name, out_name = _embeddings(model)
    return ModelMap(
        model_class=type(model).__name__,
        prefix=str(getattr(model, "base_model_prefix", "") or ""),
        params=tuple(params),
        stored=stored,
        saved_as=saved_as,
        fused={k: v for k, v in fused_params(rules, names).items() if k not in cut},
        groups=groups,
        untied_groups=untied,
        untie_by_config=by_config,
        keep_fp32=_keep_fp32(model, params),
        input_embedding=in_name,
        output_embedding=out_name,
        transposed_experts=frozenset(n for n, m in model.named_modules() if getattr(m, "is_transposed", False)),
        loaded=frozenset(model.state_dict(keep_vars=True)),
        pieces=cut,
        uncut=uncut,
    )


def key_renamer(model: Any, rules: ConversionRules | None = None) -> Any:
    """checkpoint key -> model parameter name, exactly as ``from_pretrained`` renames keys."""
    rules = rules or ConversionRules.of(model)

    def to_model(key: str) -> str:
        """The parameter name; for a key a converter fuses with others (MoE experts), ``name#converted``."""
        renamed, pattern = rules.rename(key)
        if renamed not in rules.shapes and key in rules.shapes:
            renamed, pattern = rules.rename(key, convert=False)
        return f"{renamed}#converted" if pattern is not None else renamed

    return to_model


def _checkpoint_name(param: str, to_model: Any, model_of: Mapping[str, str]) -> str:
    """The name a tensor of its own for ``param`` takes in the checkpoint's naming (for a tied alias
    or a new head, which the checkpoint does not store): a name that loads into ``param``, spelled
    like the checkpoint's names for the same module path where they differ from the model's."""
    pieces = param.split(".")
    candidates = [param, ".".join(pieces[1:])]
    firsts: dict[str, int] = {}
    for key, model_key in model_of.items():
        first = key.split(".", 1)[0]
        firsts[first] = firsts.get(first, 0) + 1
        if model_key == key:
            continue
        # a renamed key: carry its renaming (e.g. `model.language_model.` <- `language_model.model.`) over
        for i in range(1, len(pieces)):
            head, tail = ".".join(pieces[:i]) + ".", ".".join(pieces[i:])
            if model_key.startswith(head) and key.endswith(model_key[len(head) :]):
                candidates.append(key[: len(key) - len(model_key) + len(head)] + tail)
    fitting = [c for c in dict.fromkeys(candidates) if c and to_model(c) == param]
    if not fitting:
        return param
    return max(fitting, key=lambda c: (firsts.get(c.split(".", 1)[0], 0), -len(c)))


def tied_groups(model: Any) -> tuple[tuple[str, ...], ...]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return tuple(tuple(g) for g in by_id.values() if len(g) > 1)


def _untied(folder: Path, class_name: str | None, model: Any, groups: tuple[tuple[str, ...], ...]) -> tuple[
    tuple[tuple[str, ...], ...], bool
]:  # fmt: skip
    """Groups with ``tie_word_embeddings=false``, and whether that setting changes anything else."""
    if not groups:
        return (), True
    try:
        untied = build_meta_model(folder, class_name, config_overrides={"tie_word_embeddings": False})
    except ModelMapError:
        return groups, False
    before = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    after = {k: v for k, v in untied.config.to_dict().items() if not k.startswith("_")}
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)} - {"tie_word_embeddings"}
    for sub in ("text_config", "decoder", "encoder"):
        if isinstance(before.get(sub), dict) and isinstance(after.get(sub), dict):
            inner = {k for k in set(before[sub]) | set(after[sub]) if before[sub].get(k) != after[sub].get(k)}
            if inner <= {"tie_word_embeddings"}:
                changed.discard(sub)
    return tied_groups(untied), not changed


def _embeddings(model: Any) -> tuple[str | None, str | None]:
    names = {id(m): n for n, m in model.named_modules()}
    try:
        inp = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        inp = None
    try:
        out = model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        out = None
    return (names.get(id(inp)) if inp is not None else None, names.get(id(out)) if out is not None else None)


def _keep_fp32(model: Any, params: list[str]) -> dict[str, frozenset[str]]:
    """Parameters transformers upcasts to float32 on load, per stored dtype (F16, BF16)."""
    loose = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    strict = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])

    def matching(patterns: set[str]) -> frozenset[str]:
        if not patterns:
            return frozenset()
        regex = re.compile("|".join(p.replace("*", ".*") for p in patterns))
        return frozenset(p for p in params if regex.search(p))

    return {"F16": matching(loose | strict), "BF16": matching(strict)}
