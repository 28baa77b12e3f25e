"""WaveFT (``peft_type: WAVEFT``): ``W' = W + crop(IDWT(D)) * scaling``, D a sparse set of trained wavelet coefficients.

PEFT 0.21: ``tuners/waveft/layer.py`` (``WaveFTLayer.update_layer``, ``get_delta_weight``, ``WaveFTLinear.merge``),
``tuners/waveft/model.py`` (``WaveFTModel._create_and_replace``: ``n_frequency`` from ``proportional_parameters``,
then ``n_frequency_pattern``, then ``n_frequency``; ``_calculate_proportional_parameters``), ``tuners/waveft/
waverec2d.py`` (``waverec2d``, ``_construct_2d_filt``, ``_outer``, ``_get_filter_tensors``), ``tuners/waveft/
wavelet.py`` (``Wavelet._compute_filters``, ``_WAVELET_COEFFS``), ``tuners/waveft/constants.py``
(``WAVELET_REDUCTIONS``) and ``tuners/waveft/config.py`` (``WaveFTConfig``: ``n_frequency = 2592``, ``scaling =
25.0``, ``wavelet_family = "db1"``, ``use_idwt = True``, ``random_loc_seed = 777``).

Only ``waveft_spectrum`` (n values) is saved; the places are drawn as FourierFT's
(:func:`loraship.methods.fourierft._indices`: ``randperm(out·in, Generator().manual_seed(random_loc_seed))[:n]``).
``get_delta_weight`` with ``use_idwt``: an fp32 zero matrix of ``(out + ρr, in + ρc)`` (the family's reduction,
each made even), the spectrum scattered at the places shifted by half the padding, split into its four quadrants
``cA, cH, cV, cD``, one level of PEFT's own inverse DWT: the four stacked, ``conv_transpose2d`` (stride 2) with the
2-D filters (outer products of the reconstruction low/high-pass filters: ``ll, lh, hl, hh``), cropped by
``(2L - 3) // 2`` on every side; times ``scaling`` and cropped to ``(out, in)`` around the centre. Without
``use_idwt`` the scattered matrix times ``scaling``. The filters are PEFT's table (PyWavelets' coefficients; coiflets
times √2), copied below as the same Python floats, so every op and operand is PEFT's. fp32 throughout; transposed
for a Conv1D and added in place to W (one rounding). Families PEFT's config accepts but has no filters for
(``db11``–``db38``, ``sym11``–``sym20``, ``coif6``–``coif17``) fail in PEFT's own merge: refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, pattern_key, span
from loraship.methods.fourierft import _indices
from loraship.methods.vera import is_seed

if TYPE_CHECKING:
    import torch

_SPECTRUM = "waveft_spectrum"


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class WaveFT(Method):
    peft_type = "WAVEFT"
    name = "WaveFT"
    roles = (_SPECTRUM,)
    fields: ClassVar[dict[str, tuple[str, Callable[[Any], bool]]]] = {
        "n_frequency": ("a whole number from 1", lambda v: _is_whole(v, 1)),
        "scaling": ("a number", _is_number),
        "wavelet_family": ("the name of a wavelet family PEFT's WaveFT lists", lambda v: v in _REDUCTIONS),
        "use_idwt": ("true or false", lambda v: isinstance(v, bool)),
        "random_loc_seed": ("a whole number (a torch seed)", is_seed),
        "n_frequency_pattern": ("a mapping of names to whole numbers from 1", lambda v: isinstance(v, dict) and all(
            _is_whole(x, 1) for x in v.values())),
        "proportional_parameters": ("true or false", lambda v: isinstance(v, bool)),
        "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
        "init_weights": ("true or false", lambda v: isinstance(v, bool)),
    }  # fmt: skip

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if set(tensors) != {_SPECTRUM}:
            raise incomplete(folder, name, set(tensors), self.name)
        for key in ("n_frequency", "scaling", "wavelet_family", "use_idwt", "random_loc_seed"):
            if key in config and config[key] is None:
                raise AdapterError(
                    f"`{folder}` sets `{key}` to null, but PEFT's WaveFTConfig needs a value there to merge.",
                    fix=f"Restore `{key}` as PEFT saved it with these weights, or save the adapter again with PEFT.",
                )
        if len(tensors[_SPECTRUM].shape) != 1:
            raise AdapterError(
                f"`{folder}`: the WaveFT module `{name}` has {_SPECTRUM} {list(tensors[_SPECTRUM].shape)}, but PEFT "
                "saves it as one row of n_frequency values and cannot load it.",
                fix="The adapter file is not one PEFT saved: save the adapter again with PEFT.",
            )
        patterns = dict(config.get("n_frequency_pattern") or {})
        found = pattern_key(patterns, name) or (name if name in patterns else None)  # PEFT's get_pattern_key
        if config.get("proportional_parameters"):
            n, source = 0, "proportional_parameters"  # known with the layers (with_layers)
        elif found is not None:
            n, source = int(patterns[found]), f"n_frequency_pattern[{found!r}]"
        else:
            n, source = int(config.get("n_frequency", 2592)), "n_frequency"
        settings = (
            ("n", n),
            ("n_from", source),
            ("budget", int(config.get("n_frequency", 2592))),
            ("seed", int(config.get("random_loc_seed", 777))),
            ("scaling", config.get("scaling", 25.0)),
            ("family", str(config.get("wavelet_family", "db1"))),
            ("idwt", bool(config.get("use_idwt", True))),
        )
        return MethodModule(self.peft_type, name, tuple(tensors.items()), settings)

    def with_layers(
        self, m: MethodModule, layers: tuple[tuple[str, int, int], ...], *, ordered: bool = True
    ) -> MethodModule:
        """``_calculate_proportional_parameters``: each layer's share of ``n_frequency`` times the layer count."""
        if m.setting("n_from") != "proportional_parameters" or not layers:
            return m
        total_sum = sum(o * i for _, o, i in layers)
        total_budget = m.setting("budget") * len(layers)
        sizes = {name: max(1, round((o * i) / total_sum * total_budget)) for name, o, i in layers}
        if m.module not in sizes:
            return m
        kept = tuple((k, v) for k, v in m.settings if k != "n")
        return MethodModule(m.method, m.module, m.tensors, (*kept, ("n", sizes[m.module])))

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if len(shape) != 2:
            return Unsupported(
                f"WaveFT on a {len(shape)}-D weight is not merged (PEFT's WaveFT adapts only Linear and Conv1D layers)"
            )
        if m.setting("idwt") and m.setting("family") not in _COEFFS:
            return Unsupported(
                f"WaveFT with wavelet_family {m.setting('family')!r} is not merged: PEFT 0.21's WaveFT accepts that "
                "family in its config but has no filters for it, so its own merge (and forward pass) fails"
            )
        out_features, in_features = (shape[1], shape[0]) if fan_in_fan_out else shape
        (length,), n = m.shape(_SPECTRUM), m.setting("n")
        if length != n:
            return (
                f"the adapter's {_SPECTRUM} has {length} coefficients, while its {m.setting('n_from')} makes PEFT "
                f"build {n} for this layer"
            )
        if n > out_features * in_features:
            return (
                f"the adapter's {_SPECTRUM} has {n} coefficients, more than the {out_features} x {in_features} = "
                f"{out_features * in_features} places of a weight of {out_features} outputs and {in_features} inputs"
            )
        return None

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        out_features, in_features = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
        spectrum = adapter_float(tensors[_SPECTRUM])
        indices = _indices(out_features, in_features, m.setting("seed"), spectrum.shape[0])
        delta = delta_weight(spectrum, indices, out_features, in_features, m)
        weight += delta.T if fan_in_fan_out else delta
        return weight

    def describe(self, m: MethodModule) -> str:
        wavelet = f"{m.setting('family')} IDWT" if m.setting("idwt") else "no IDWT"
        return f"WaveFT {m.shape(_SPECTRUM)[0]} coefficients, {wavelet}, scaling {m.setting('scaling'):g}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        families = sorted({m.setting("family") if m.setting("idwt") else "no IDWT" for m in modules})
        return (
            f"n_frequency = {span([m.shape(_SPECTRUM)[0] for m in modules])}, "
            f"scaling = {span([m.setting('scaling') for m in modules])}, wavelet_family = {', '.join(families)}"
        )


def delta_weight(
    spectrum: torch.Tensor, indices: torch.Tensor, out_features: int, in_features: int, m: MethodModule
) -> torch.Tensor:
    """``WaveFTLayer.get_delta_weight``: the ``(out, in)`` delta."""
    import torch

    scaling = m.setting("scaling")
    if not m.setting("idwt"):
        dense = torch.zeros(out_features, in_features, dtype=spectrum.dtype)
        dense[indices[0, :], indices[1, :]] = spectrum
        return dense * scaling
    reduction_rows, reduction_cols = _REDUCTIONS[m.setting("family")]
    padded_out, padded_in = out_features + reduction_rows, in_features + reduction_cols
    padded_out += padded_out % 2
    padded_in += padded_in % 2
    dense = torch.zeros(padded_out, padded_in, dtype=spectrum.dtype)
    padded = indices.clone()
    padded[0, :] += (padded_out - out_features) // 2
    padded[1, :] += (padded_in - in_features) // 2
    valid = (padded[0, :] < padded_out) & (padded[1, :] < padded_in)
    kept = padded[:, valid]
    dense[kept[0, :], kept[1, :]] = spectrum[valid]
    h2, w2 = dense.shape[0] // 2, dense.shape[1] // 2
    quadrants = (dense[:h2, :w2], dense[:h2, w2:], dense[h2:, :w2], dense[h2:, w2:])
    delta = _waverec2d(quadrants, m.setting("family")) * scaling
    if delta.shape[0] != out_features or delta.shape[1] != in_features:
        start_row = (delta.shape[0] - out_features) // 2
        start_col = (delta.shape[1] - in_features) // 2
        delta = delta[start_row : start_row + out_features, start_col : start_col + in_features]
    return delta


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1).unsqueeze(-1) * b.reshape(-1).unsqueeze(0)


def _waverec2d(quadrants: tuple[torch.Tensor, ...], family: str) -> torch.Tensor:
    """PEFT's ``waverec2d`` for its one level ``(cA, (cH, cV, cD))`` of a 2-D input."""
    import torch

    base = _COEFFS["db1" if family == "haar" else family]
    scale = math.sqrt(2) if family.startswith("coif") else 1.0
    scaled = [c * scale for c in base]
    rec_hi_list = [(-1) ** i * scaled[len(scaled) - 1 - i] for i in range(len(scaled))]
    dtype = quadrants[0].dtype
    rec_lo, rec_hi = torch.tensor(scaled, dtype=dtype), torch.tensor(rec_hi_list, dtype=dtype)
    filt_len = rec_lo.shape[-1]
    rec_filt = torch.stack(
        [_outer(rec_lo, rec_lo), _outer(rec_hi, rec_lo), _outer(rec_lo, rec_hi), _outer(rec_hi, rec_hi)], 0
    ).unsqueeze(1)
    res = torch.stack([q.unsqueeze(0) for q in quadrants], 1)
    res = torch.nn.functional.conv_transpose2d(res, rec_filt, stride=2).squeeze(1)
    pad = (2 * filt_len - 3) // 2
    if pad > 0:
        res = res[..., pad:-pad, pad:-pad]
    return res.squeeze(0)


# fmt: off
#: PEFT's ``wavelet._WAVELET_COEFFS`` (from PyWavelets): each family's reconstruction low-pass filter, as the
#: Python floats PEFT parses from its literals (``repr`` round-trips them exactly).
_COEFFS: dict[str, tuple[float, ...]] = {
    "db1": (
        0.7071067811865476, 0.7071067811865476,
    ),
    "db2": (
        0.48296291314453416, 0.8365163037378079, 0.2241438680420134, -0.12940952255126037,
    ),
    "db3": (
        0.33267055295008263, 0.8068915093133388, 0.4598775021193313, -0.13501102001039084, -0.08544127388224149,
        0.035226291882100656,
    ),
    "db4": (
        0.2303778133088965, 0.7148465705529157, 0.6308807679298589, -0.027983769416859854, -0.18703481171909309,
        0.030841381835560764, 0.0328830116668852, -0.010597401785069032,
    ),
    "db5": (
        0.16010239797419293, 0.6038292697971896, 0.7243085284377729, 0.13842814590132074, -0.24229488706638203,
        -0.032244869584638375, 0.07757149384004572, -0.006241490212798274, -0.012580751999081999,
        0.0033357252854737712,
    ),
    "db6": (
        0.11154074335010947, 0.49462389039845306, 0.7511339080210954, 0.31525035170919763, -0.22626469396543983,
        -0.12976686756726194, 0.09750160558732304, 0.027522865530305727, -0.03158203931748603, 0.0005538422011614961,
        0.004777257510945511, -0.0010773010853084796,
    ),
    "db7": (
        0.07785205408500918, 0.3965393194819173, 0.7291320908462351, 0.4697822874051931, -0.14390600392856498,
        -0.22403618499387498, 0.07130921926683026, 0.08061260915108308, -0.03802993693501441, -0.01657454163066688,
        0.01255099855609984, 0.0004295779729213665, -0.0018016407040474908, 0.00035371379997452024,
    ),
    "db8": (
        0.05441584224310401, 0.31287159091429995, 0.6756307362972898, 0.5853546836542067, -0.015829105256349306,
        -0.2840155429615469, 0.0004724845739132828, 0.12874742662047847, -0.017369301001807547,
        -0.044088253930794755, 0.013981027917398282, 0.008746094047405777, -0.004870352993451574,
        -0.00039174037337694705, 0.0006754494064505693, -0.00011747678412476953,
    ),
    "db9": (
        0.038077947363878345, 0.24383467461259034, 0.6048231236901112, 0.6572880780513005, 0.13319738582500756,
        -0.2932737832791749, -0.09684078322297646, 0.14854074933810638, 0.03072568147933338, -0.06763282906132997,
        0.00025094711483145197, 0.022361662123679096, -0.004723204757751397, -0.00428150368246343,
        0.0018476468830562265, 0.00023038576352319597, -0.0002519631889427101, 3.93473203162716e-05,
    ),
    "db10": (
        0.026670057900555554, 0.1881768000776915, 0.5272011889317256, 0.6884590394536035, 0.2811723436605775,
        -0.24984642432731538, -0.19594627437737705, 0.12736934033579325, 0.09305736460357235, -0.07139414716639708,
        -0.029457536821875813, 0.033212674059341, 0.0036065535669561697, -0.010733175483330575, 0.001395351747052901,
        0.001992405295185056, -0.0006858566949597116, -0.00011646685512928545, 9.358867032006959e-05,
        -1.3264202894521244e-05,
    ),
    "sym2": (
        0.48296291314469025, 0.836516303737469, 0.22414386804185735, -0.12940952255092145,
    ),
    "sym3": (
        0.3326705529509569, 0.8068915093133388, 0.4598775021193313, -0.13501102001039084, -0.08544127388224149,
        0.035226291882100656,
    ),
    "sym4": (
        0.0322231006040427, -0.012603967262037833, -0.09921954357684722, 0.29785779560527736, 0.8037387518059161,
        0.49761866763201545, -0.02963552764599851, -0.07576571478927333,
    ),
    "sym5": (
        0.019538882735286728, -0.021101834024758855, -0.17532808990845047, 0.01660210576452232, 0.6339789634582119,
        0.7234076904024206, 0.1993975339773936, -0.039134249302383094, 0.029519490925774643, 0.027333068345077982,
    ),
    "sym6": (
        -0.007800708325034148, 0.0017677118642428036, 0.04472490177066578, -0.021060292512300564,
        -0.07263752278646252, 0.3379294217276218, 0.787641141030194, 0.4910559419267466, -0.048311742585633,
        -0.11799011114819057, 0.0034907120842174702, 0.015404109327027373,
    ),
    "sym7": (
        0.010268176708511255, 0.004010244871533663, -0.10780823770381774, -0.14004724044296152, 0.2886296317515146,
        0.767764317003164, 0.5361019170917628, 0.017441255086855827, -0.049552834937127255, 0.0678926935013727,
        0.03051551316596357, -0.01263630340325193, -0.0010473848886829163, 0.002681814568257878,
    ),
    "sym8": (
        0.0018899503327594609, -0.0003029205147213668, -0.01495225833704823, 0.003808752013890615,
        0.049137179673607506, -0.027219029917056003, -0.05194583810770904, 0.3644418948353314, 0.7771857517005235,
        0.4813596512583722, -0.061273359067658524, -0.1432942383508097, 0.007607487324917605, 0.03169508781149298,
        -0.0005421323317911481, -0.0033824159510061256,
    ),
    "sym9": (
        0.0010694900329086053, -0.0004731544986800831, -0.010264064027633142, 0.008859267493400484,
        0.06207778930288603, -0.018233770779395985, -0.19155083129728512, 0.035272488035271894, 0.6173384491409358,
        0.717897082764412, 0.238760914607303, -0.05456895843083407, 0.0005834627461258068, 0.03022487885827568,
        -0.01152821020767923, -0.013271967781817119, 0.0006197808889855868, 0.0014009155259146807,
    ),
    "sym10": (
        -0.0004593294210046588, 5.7036083618494284e-05, 0.004593173585311828, -0.0008043589320165449,
        -0.02035493981231129, 0.005764912033581909, 0.04999497207737669, -0.0319900568824278, -0.03553674047381755,
        0.38382676106708546, 0.7695100370211071, 0.47169066693843925, -0.07088053578324385, -0.15949427888491757,
        0.011609893903711381, 0.0459272392310922, -0.0014653825813050513, -0.008641299277022422,
        9.563267072289475e-05, 0.0007701598091144901,
    ),
    "coif1": (
        -0.05142972847076845, 0.23892972847076846, 0.6028594569415369, 0.2721405430584631, -0.05142972847076845,
        -0.011070271529231544,
    ),
    "coif2": (
        0.011587596738716868, -0.029320137983468563, -0.04763959031100813, 0.2730210465347666, 0.5746823938568638,
        0.2948671936956192, -0.05408560709171143, -0.042026480460771606, 0.016744410163279506, 0.003967883612962012,
        -0.0012892033561406595, -0.0005095053991076441,
    ),
    "coif3": (
        -0.0026824186709220686, 0.005503126707831385, 0.016583560479170346, -0.046507764478726975,
        -0.043220763560211914, 0.28650333527364746, 0.56128525687033, 0.30298357177282415, -0.050770140754888865,
        -0.05819625076158553, 0.024434094321166958, 0.011229240962037866, -0.006369601011048823,
        -0.0018204589155662422, 0.0007902051009575939, 0.000329665173793183, -5.019277455327665e-05,
        -2.4465734255308132e-05,
    ),
    "coif4": (
        0.0006309612114309468, -0.0011522251437699736, -0.005194525163470323, 0.01136093089978195,
        0.01894506104561664, -0.05171984370581528, -0.03448614047094481, 0.30227251053656845, 0.5545479062408811,
        0.30791766802517506, -0.0435250092812657, -0.064887950971431, 0.01988077364815952, 0.017638947871261697,
        -0.007366054847173364, -0.002312432307658842, 0.0014260063442333715, 0.00046669846355373536,
        -0.0001270007842387334, -0.0001130536369789105, 3.048364879677801e-05, 1.2667448089330081e-05,
        -1.5849265807568937e-06, -1.1239480882815428e-06,
    ),
    "coif5": (
        -0.0001444992186438191, 0.00025416494920119467, 0.0015016192805175522, -0.0029411108712655517,
        -0.007177767151487719, 0.016680426640070654, 0.019433238433489604, -0.0649349465672125, -0.03624979308913257,
        0.2980426621780944, 0.5574916297092007, 0.3073164452920678, -0.04708803471976115, -0.06889052250805007,
        0.020697343297747767, 0.021640668655956857, -0.008108937307895367, -0.004988173767104185,
        0.002448691432102127, 0.0014095103899593442, -0.0005637801876093826, -0.0002859004477225751,
        0.00012739637513815207, 5.416263410701044e-05, -1.7368679443462806e-05, -1.3926561900600109e-05,
        3.582065515946049e-06, 1.9140228958473188e-06, -3.12624883770169e-07, -3.4030635502511645e-07,
        5.981606523851694e-08, 4.700142784945649e-08, -6.1586157096783646e-09, -9.225635096344936e-09,
        1.0284860745188212e-09, 1.1687341751862637e-09, -9.468626176069127e-11, -1.6230233142152042e-10,
        1.507665685934695e-11, 1.5770990416421914e-11, -1.084900468648598e-12, -1.9686597794118046e-12,
        9.874563463972664e-14, 1.967347814605081e-13, -8.02108014529989e-15, -2.1030408801651653e-14,
        7.238886978309157e-16, 1.9432085150727615e-15,
    ),
}
#: PEFT's ``constants.WAVELET_REDUCTIONS``: the padding (rows, columns) each family's reconstruction needs.
_REDUCTIONS: dict[str, tuple[int, int]] = {
    "db1": (0, 0), "db2": (2, 2), "db3": (4, 4), "db4": (6, 6), "db5": (8, 8), "db6": (10, 10), "db7": (12, 12),
    "db8": (14, 14), "db9": (16, 16), "db10": (18, 18), "db11": (20, 20), "db12": (22, 22), "db13": (24, 24),
    "db14": (26, 26), "db15": (28, 28), "db16": (30, 30), "db17": (32, 32), "db18": (34, 34), "db19": (36, 36),
    "db20": (38, 38), "db21": (40, 40), "db22": (42, 42), "db23": (44, 44), "db24": (46, 46), "db25": (48, 48),
    "db26": (50, 50), "db27": (52, 52), "db28": (54, 54), "db29": (56, 56), "db30": (58, 58), "db31": (60, 60),
    "db32": (62, 62), "db33": (64, 64), "db34": (66, 66), "db35": (68, 68), "db36": (70, 70), "db37": (72, 72),
    "db38": (74, 74), "sym2": (2, 2), "sym3": (4, 4), "sym4": (6, 6), "sym5": (8, 8), "sym6": (10, 10),
    "sym7": (12, 12), "sym8": (14, 14), "sym9": (16, 16), "sym10": (18, 18), "sym11": (20, 20),
    "sym12": (22, 22), "sym13": (24, 24), "sym14": (26, 26), "sym15": (28, 28), "sym16": (30, 30),
    "sym17": (32, 32), "sym18": (34, 34), "sym19": (36, 36), "sym20": (38, 38), "coif1": (4, 4),
    "coif2": (10, 10), "coif3": (16, 16), "coif4": (22, 22), "coif5": (28, 28), "coif6": (34, 34),
    "coif7": (40, 40), "coif8": (46, 46), "coif9": (52, 52), "coif10": (58, 58), "coif11": (64, 64),
    "coif12": (70, 70), "coif13": (76, 76), "coif14": (82, 82), "coif15": (88, 88), "coif16": (94, 94),
    "coif17": (100, 100),
}
# fmt: on


METHOD = WaveFT()
