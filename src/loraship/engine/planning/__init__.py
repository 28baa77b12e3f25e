"""The planner's phases, in order (:func:`loraship.engine.planner.plan_merge` runs them). Pure.

:mod:`.state` holds the inputs and what each phase adds; :mod:`.collect` turns the adapter's tensors
into steps per base tensor (fused MoE experts included); :mod:`.place` puts the steps on output
tensors (single and tied targets, name resolution through :mod:`.names`); :mod:`.checks` refuses
what cannot be merged (unmatched tensors, unknown tying, vocabulary, float dtypes, accounting);
:mod:`.build` makes the :class:`~loraship.engine.plan.MergePlan`.
"""
