"""OSF (``peft_type: OSF``): ``W' = W + (U_low S_low V_low - U₀ S₀ V₀)``, ``U₀ S₀ V₀`` the low part of W's own SVD.

PEFT 0.21: ``tuners/osf/layer.py`` (``OSFLayer.update_layer``, ``get_delta_weight``, ``merge``), ``tuners/osf/utils.py``
(``decompose_weight_matrix``) and ``tuners/osf/model.py`` (``effective_rank``, ``rank_pattern``). Saved per module:
``osf_svd_params.U_low`` ``(out, m)``, ``S_low`` ``(m,)``, ``V_low`` ``(m, in)``, the trainable low part of the SVD, of
``m = min(out, in) - k`` singular directions past the ``k`` (``effective_rank``) PEFT freezes. The frozen initial low
part ``U₀ S₀ V₀`` is not saved: PEFT recomputes it when it loads the adapter, from the base weight it is given.

That recomputation is reproduced op for op: ``torch.linalg.svd(W.to(fp32), full_matrices=False)`` on CPU (the same
LAPACK call on the same fp32 values gives the same bits), ``U[:, k:]``, ``S[k:]``, ``Vh[k:, :]`` cast to W's dtype
(``decompose_weight_matrix``) and, on a half-precision base, back to fp32 (PEFT's ``autocast_adapter_dtype`` upcasts
these buffers as it does the trainable factors: the values stay rounded to W's dtype). Then ``current = mm(U_low *
S_low.unsqueeze(0), V_low)``, ``initial = mm(U₀ * S₀.unsqueeze(0), V₀)`` (both fp32), ``delta = current - initial``
and the merge ``(W + delta).to(W.dtype)``. ``k`` is read from the saved shapes (``min(out, in) - m``), as PEFT sizes
them from it. PEFT adapts Linear layers only; the bias is left alone.

Measured: bit-identical to PEFT on fp32, bf16 and fp16 bases (256 x 96 layers included) when both run with the same
torch build and thread count. MKL's SVD rounds differently with another thread count, and so does PEFT's own merge:
on a 256 x 96 weight, 1 thread against 2 changes 98 % of the merged fp32 elements (by up to 1e-5) and 5.6 % of the
bf16 ones (by one unit in the last place). loraship computes the SVD on the thread that merges (torch's default
threads, one per core, as a PEFT run gets by default); ``loraship verify`` shows any difference.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

_U, _S, _V = "osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low"


class OSF(Method):
    peft_type = "OSF"
    name = "OSF"
    kind = "multiplicative"
    roles = (_U, _S, _V)

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if set(tensors) != {_U, _S, _V}:
            raise incomplete(folder, name, set(tensors), self.name)
        u, s, v = (tuple(tensors[role].shape) for role in (_U, _S, _V))
        if len(u) != 2 or len(v) != 2 or s != (u[1],) or v[0] != u[1]:
            raise AdapterError(
                f"`{folder}`: the OSF module `{name}` has U_low {list(u)}, S_low {list(s)} and V_low {list(v)}, but "
                "PEFT makes them (out, m), (m,) and (m, in) and cannot load these.",
                fix="The adapter file is damaged or not PEFT's: save the adapter again with PEFT.",
            )
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), (("trainable_rank", u[1]),))

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if fan_in_fan_out or len(shape) != 2:
            return Unsupported("OSF on a layer other than a Linear one is not merged (PEFT's OSF adapts Linear layers)")
        u, v = m.shape(_U), m.shape(_V)
        if shape == (u[0], v[1]) and u[1] < min(shape):
            return None
        return (
            f"the adapter's U_low {list(u)} and V_low {list(v)} need a [{u[0]}, {v[1]}] weight with more than "
            f"{u[1]} singular directions"
        )

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        orig_dtype = weight.dtype
        U, S, Vt = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
        k = S.shape[0] - m.setting("trainable_rank")
        # cast to W's dtype, then (PEFT's autocast_adapter_dtype, buffers included) back to fp32
        U_low_init = adapter_float(U[:, k:].contiguous().to(dtype=orig_dtype))
        S_low_init = adapter_float(S[k:].contiguous().to(dtype=orig_dtype))
        V_low_init = adapter_float(Vt[k:, :].contiguous().to(dtype=orig_dtype))
        U_low, S_low, V_low = (adapter_float(tensors[role]) for role in (_U, _S, _V))
        current = torch.mm(U_low * S_low.unsqueeze(0), V_low)
        initial = torch.mm(U_low_init * S_low_init.unsqueeze(0), V_low_init)
        delta = current - initial
        return (weight + delta).to(orig_dtype)

    def describe(self, m: MethodModule) -> str:
        return f"OSF {m.setting('trainable_rank')} trainable singular directions (SVD of W recomputed)"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return (
            f"trainable rank = {span([m.setting('trainable_rank') for m in modules])} (the frozen part recomputed "
            "from each base weight's SVD, as PEFT does at load)"
        )


METHOD = OSF()
