"""Name resolution without transformers: adapter parameter names -> base tensor names. Pure.

Input: the base checkpoint's tensor names. Output: the base tensor an adapter's ``module.param``
is loaded from, or None. Used by :class:`~loraship.engine.planning.state.PlanState` when no
:class:`~loraship.engine.model_map.ModelMap` is known.
"""

from __future__ import annotations

from collections.abc import Iterable


class NameResolver:
    """Maps adapter parameter names to base tensor names when transformers cannot build the model.

    transformers loads a checkpoint into a model whose names differ at most by the model's
    ``base_model_prefix``, added or removed on one side (a ``BertModel`` checkpoint into
    ``BertForSequenceClassification``). Without the class, any single leading segment that is not
    a layer number stands in for that prefix: it is added to or removed from the adapter's name,
    never removed from both sides (that would map ``classifier.dense`` onto ``lm_head.dense``).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)
        self._by_tail: dict[str, list[str]] = {}
        for name in self.names:
            head, _, tail = name.partition(".")
            if tail and not head.isdigit():
                self._by_tail.setdefault(tail, []).append(name)

    def resolve(self, module: str, param: str) -> str | None:
        full = f"{module}.{param}" if module else param
        if full in self.names:
            return full
        head, _, tail = full.partition(".")
        if tail and not head.isdigit() and tail in self.names:
            return tail
        found = self._by_tail.get(full, [])
        return found[0] if len(found) == 1 else None
