"""PSOFT (``peft_type: PSOFT``): ``W' = W + scale · B (R - I) A``, A and B the top-r SVD of W itself, R a trained
(orthogonal, magnitude-scaled) ``r x r`` rotation.

PEFT 0.21: ``tuners/psoft/layer.py`` (``OrthLayer.get_matrix``, ``_skew_symmetric``, ``_project_Q``,
``PsoftLayer.update_layer``, ``_build_psoft_ab_cache_buffers``, ``_compute_svd_factors``, ``Linear.get_delta_weight``,
``Linear.merge``) and ``tuners/psoft/config.py`` (``PsoftConfig``). Saved per module: ``psoft_R.weight`` (the strict
upper triangle of a skew-symmetric Q, ``r(r-1)/2``, with ``psoft_orth``; else R itself, ``(r, r)``) and the magnitude
vectors ``psoft_R.vector_b``, ``psoft_R.vector_a`` ``(r,)`` (with ``psoft_mag_b``, ``psoft_mag_a``). A and B are not
saved: PEFT recomputes them when it loads the adapter, from the base weight it is given.

That recomputation is reproduced op for op: ``W.to(fp32)``; ``psoft_svd = "full"``: ``torch.linalg.svd(W,
full_matrices=False)``, ``U[:, :r]``, ``S[:r]``, ``Vh[:r, :]``; ``"lowrank"``: ``torch.svd_lowrank(W, q=r, niter)``
in ``torch.random.fork_rng(devices=[])`` after ``torch.manual_seed(random_seed)``. ``S / scale`` (``scale =
psoft_alpha / r``); ``psoft_init``: ``A = Vh_r``, ``B = U_r @ diag(S_r/scale)``; ``pissa_init``: ``A = diag(√) @
Vh_r``, ``B = U_r @ diag(√)``. R: ``Q = index_put(zeros, triu, weight) - its transpose``, then the Cayley-Neumann
series (``Q`` first scaled to Frobenius norm ``eps`` when ``cayley_neumann_eps`` is set and exceeded) or
``solve(I - Q, I + Q, left=False)``; ``vector_b[:, None] * R * vector_a[None, :]``. All in fp32 (PEFT holds the
adapter in fp32). The delta ``(B @ (R - I) @ A) * scale``, rounded to W's dtype and added in place. PEFT adapts Linear
layers only; the bias is left alone.

Measured: bit-identical to PEFT on fp32, bf16 and fp16 bases when both run with the same torch build and thread
count. MKL's SVD (and so PEFT's own merge) rounds differently with another thread count: with r = 16 on a 256 x 96
weight, 1 thread against 2 changes 99.7 % of the merged fp32 elements (by up to 7e-5) and 0.6 % of the bf16 ones (by
one unit in the last place). loraship computes it on the thread that merges (torch's default threads, as a PEFT run
gets by default); ``loraship verify`` shows any difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

_WEIGHT, _VB, _VA = "psoft_R.weight", "psoft_R.vector_b", "psoft_R.vector_a"


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


#: adapter_config.json fields PSOFT reads, with what PEFT's PsoftConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "psoft_alpha": ("a number", _is_number),
    "ab_svd_init": ('"psoft_init" or "pissa_init"', lambda v: v in ("psoft_init", "pissa_init")),
    "psoft_svd": ('"full" or "lowrank"', lambda v: v in ("full", "lowrank")),
    "psoft_svd_lowrank_niter": ("a whole number from 0", lambda v: _is_whole(v, 0)),
    "random_seed": ("a whole number", lambda v: _is_whole(v, -(2**63))),
    "psoft_orth": ("true or false", _is_bool),
    "psoft_mag_a": ("true or false", _is_bool),
    "psoft_mag_b": ("true or false", _is_bool),
    "use_cayley_neumann": ("true or false", _is_bool),
    "num_cayley_neumann_terms": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "cayley_neumann_eps": ("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1),
    "fan_in_fan_out": ("true or false", _is_bool),
    "init_weights": ("true or false", _is_bool),
    "psoft_dropout": ("a number", _is_number),
}


class PSOFT(Method):
    peft_type = "PSOFT"
    name = "PSOFT"
    kind = "multiplicative"
    roles = (_WEIGHT, _VB, _VA)
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        r = int(config.get("r", 32))
        orth, mag_b, mag_a = (bool(config.get(k, True)) for k in ("psoft_orth", "psoft_mag_b", "psoft_mag_a"))
        wanted = {_WEIGHT} | ({_VB} if mag_b else set()) | ({_VA} if mag_a else set())
        if set(tensors) != wanted:
            raise incomplete(folder, name, set(tensors), self.name)
        shapes = {role: tuple(info.shape) for role, info in tensors.items()}
        expected = {_WEIGHT: (r * (r - 1) // 2,) if orth else (r, r), _VB: (r,), _VA: (r,)}
        if any(shapes[role] != expected[role] for role in shapes):
            shown = ", ".join(f"{role.partition('.')[2]} {list(s)}" for role, s in sorted(shapes.items()))
            raise AdapterError(
                f"`{folder}`: the PSOFT module `{name}` has {shown}, but with r = {r} PEFT makes "
                + ", ".join(f"{role.partition('.')[2]} {list(expected[role])}" for role in sorted(shapes))
                + " and cannot load these.",
                fix="The adapter file does not match its adapter_config.json: save the adapter again with PEFT.",
            )
        eps = config.get("cayley_neumann_eps")
        settings = (
            ("r", r),
            ("scale", float(config.get("psoft_alpha", 32)) / r),
            ("alpha", config.get("psoft_alpha", 32)),
            ("init", str(config.get("ab_svd_init", "psoft_init"))),
            ("svd", str(config.get("psoft_svd", "full"))),
            ("niter", int(config.get("psoft_svd_lowrank_niter", 10))),
            ("seed", int(config.get("random_seed", 0))),
            ("orth", orth),
            ("cayley_neumann", bool(config.get("use_cayley_neumann", False))),
            ("terms", int(config.get("num_cayley_neumann_terms", 5))),
            ("eps", "" if eps is None else float(eps)),
        )
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if fan_in_fan_out or len(shape) != 2:
            return Unsupported(
                "PSOFT on a layer other than a Linear one is not merged (PEFT's PSOFT adapts Linear layers)"
            )
        r = m.setting("r")
        if r <= min(shape):
            return None
        return f"the adapter's rank r = {r} needs a weight of at least {r} rows and columns"

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        A, B = _ab(m, weight.to(torch.float32))
        R = _matrix(m, {role: adapter_float(t) for role, t in tensors.items()})
        r = m.setting("r")
        compute_dtype = torch.float32
        A_c, B_c, R_c = A.to(dtype=compute_dtype), B.to(dtype=compute_dtype), R.to(dtype=compute_dtype)
        id_mat = torch.eye(r, dtype=compute_dtype)
        delta = B_c @ (R_c - id_mat) @ A_c
        delta = delta * m.setting("scale")
        weight += delta.to(dtype=weight.dtype)
        return weight

    def describe(self, m: MethodModule) -> str:
        return f"PSOFT r={m.setting('r')} ({_kind(m)})"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        kinds = "; ".join(sorted({_kind(m) for m in modules}))
        scales = span([m.setting("scale") for m in modules])
        return f"r = {span([m.setting('r') for m in modules])}, scale = {scales}, {kinds}"


def _kind(m: MethodModule) -> str:
    svd = "full SVD" if m.setting("svd") == "full" else f"low-rank SVD, {m.setting('niter')} iterations"
    if not m.setting("orth"):
        rotation = "free R"
    elif m.setting("cayley_neumann"):
        rotation = f"Cayley-Neumann, {m.setting('terms')} terms"
    else:
        rotation = "exact Cayley"
    return f"{svd} of W recomputed, {m.setting('init')}, {rotation}"


def _ab(m: MethodModule, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_build_psoft_ab_cache_buffers`` (with ``_compute_svd_factors``) for ``W`` in fp32, op for op."""
    import torch

    r = m.setting("r")
    if m.setting("svd") == "full":
        U, S, Vh = torch.linalg.svd(W.data, full_matrices=False)
        Vr, Sr, Uhr = U[:, :r], S[:r], Vh[:r, :]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(m.setting("seed"))
            U, S, V = torch.svd_lowrank(W.data, q=r, niter=m.setting("niter"))
        Vr, Sr, Uhr = U[:, :r], S[:r], V[:, :r].t()
    Sr_scaled = Sr / m.setting("scale")
    if m.setting("init") == "psoft_init":
        A = Uhr
        B = Vr @ torch.diag(Sr_scaled)
    else:
        s_sqrt = torch.sqrt(Sr_scaled)
        A = torch.diag(s_sqrt) @ Uhr
        B = Vr @ torch.diag(s_sqrt)
    return A.contiguous(), B.contiguous()


def _matrix(m: MethodModule, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's ``OrthLayer.get_matrix`` (fp32 parameters), op for op."""
    import torch

    weight = t[_WEIGHT]
    size = m.setting("r")
    if not m.setting("orth"):
        R = weight
    else:
        rows, cols = torch.triu_indices(size, size, 1)
        Q = torch.zeros((size, size), dtype=weight.dtype)
        Q = Q.index_put((rows, cols), weight)
        Q = Q - Q.transpose(0, 1)
        id_mat = torch.eye(size, dtype=Q.dtype)
        if m.setting("cayley_neumann"):
            eps = m.setting("eps")
            if eps != "":
                norm = torch.linalg.norm(Q, ord="fro")
                if torch.isfinite(norm) and norm > eps:
                    Q = Q * (eps / (norm + 1e-12))
            terms = m.setting("terms")
            R = id_mat.clone()
            if terms > 1:
                R.add_(Q, alpha=2.0)
                if terms > 2:
                    Q_squared = Q @ Q
                    R.add_(Q_squared, alpha=2.0)
                    Q_power = Q_squared
                    for _ in range(3, terms - 1):
                        Q_power = Q_power @ Q
                        R.add_(Q_power, alpha=2.0)
                    Q_power = Q_power @ Q
                    R.add_(Q_power)
        else:
            R = torch.linalg.solve(id_mat - Q, id_mat + Q, left=False)
    if _VB in t:
        R = t[_VB][:, None] * R
    if _VA in t:
        R = R * t[_VA][None, :]
    return R


METHOD = PSOFT()
