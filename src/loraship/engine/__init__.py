"""The engine: base checkpoint + adapter -> a merge plan -> merged shards, by streaming safetensors.

Reads tensor headers (:mod:`.safetensors_io`) and the adapter (:mod:`.adapter`), maps names and
layouts through transformers' own rules (:mod:`.model_map`, :mod:`.conversions`, :mod:`.layouts`,
:mod:`.quantized`, :mod:`.heads`), plans every output tensor (:mod:`.planner`, in phases under
:mod:`.planning`, -> :mod:`.plan`), cross-checks the plan with transformers and PEFT (:mod:`.oracle`),
and carries it out (:mod:`.merge`, :mod:`.stream`, :mod:`.writer`). It imports neither
huggingface_hub nor PyGithub; transformers and PEFT only where the module exists to ask them (the
model map and the oracle).
"""
