"""PVeRA (``peft_type: PVERA``): probabilistic VeRA; the merge keeps the mean, ``W' = W + (λ_b ⊙ B) @ (μ_d ⊙ A_μ)``.

PEFT 0.21: ``tuners/pvera/model.py`` (``PveraModel._find_dim``, ``_init_pvera_A_pvera_B``: ``kaiming_uniform_`` of
``empty(2r, max_in)`` then ``empty(max_out, r)`` with a CPU generator seeded by ``projection_prng_key``),
``tuners/pvera/layer.py`` (``PveraLayer.update_layer``: ``pvera_lambda_d`` has ``2r`` values, the means then the
log-variances; ``Linear.get_delta_weight``, ``Linear.merge``) and ``tuners/pvera/config.py`` (``PveraConfig``).

Everything is VeRA's (:mod:`loraship.methods.vera`: shared projections, saved or drawn again from the seed,
sliced per layer, fp32 delta added in place), except that ``pvera_A`` has ``2r`` rows and the delta uses the first
half of ``pvera_lambda_d`` and of ``pvera_A``'s rows: the means. With ``sample_at_inference`` PEFT's unmerged model
draws new noise around them at every forward pass, which no merged weight can stand for: refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from loraship.errors import UnsupportedError
from loraship.methods.base import MethodModule, Saved
from loraship.methods.vera import VeRA, is_seed


class PVeRA(VeRA):
    peft_type = "PVERA"
    name = "PVeRA"
    prefix = "pvera"
    config_class = "PveraConfig"
    halves = 2
    roles = ("pvera_lambda_b", "pvera_lambda_d")
    shared = ("pvera_A", "pvera_B")
    fields: ClassVar[dict[str, tuple[str, Callable[[Any], bool]]]] = {
        **VeRA.fields,
        "sample_at_inference": ("true or false", lambda v: isinstance(v, bool)),
        "generator_seed": ("a whole number (a torch seed)", is_seed),
    }

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if config.get("sample_at_inference"):
            raise UnsupportedError(
                f"`{folder}` sets `sample_at_inference` to true: PVeRA then draws new noise around the adapter's "
                "mean at every forward pass, which no merged weight can stand for (PEFT's merge keeps only the mean).",
                fix="Ship it as an adapter (load it with PEFT on top of the base model); or, if the mean is what you "
                "want at inference, set `sample_at_inference` to false and merge again.",
            )
        return super().module(name, tensors, config, folder)


METHOD = PVeRA()
