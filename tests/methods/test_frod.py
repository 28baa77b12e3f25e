"""FRoD is refused: PEFT recomputes its shared projection at load from every base weight of a category.

PEFT 0.21 (``tuners/frod/model.py`` ``_init_frod_projections``, ``tuners/frod/layer.py`` ``update_layer``,
``_calculate_frod_u_and_lambda``, ``get_delta_weight``): when it loads a FRoD adapter, PEFT recomputes the projection
V of each category (``q_proj`` of every layer...) from the QR (or SVD) of all the category's base weights stacked, and
derives each layer's U from that V and the layer's weight, before it loads the saved V
(``base_model.frod_V.<category>``) over it; the merge is ``U (S + diag(lambda_l)) Vᵀ - W`` with that U and the saved
V. A value computed across several base tensors does not fit loraship's one-tensor-at-a-time merge, so loraship has no
FRoD method and refuses the type.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import LLAMA

from loraship.engine.merge import merge
from loraship.errors import UnsupportedError
from loraship.tiny import build_method_adapter


def test_refused_with_what_to_do(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "FROD", target_modules=["q_proj"], progressbar=False)
    with pytest.raises(UnsupportedError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message.startswith(
        f"`{adapter / 'adapter_config.json'}` is an FROD adapter: a method PEFT can merge, but loraship does not merge "
        "yet (it merges LoRA"
    )
    assert e.value.fix == (
        "Merge it with PEFT itself: PeftModel.from_pretrained(base, adapter).merge_and_unload(), then check the "
        "result with `loraship verify`."
    )
    assert not (tmp_path / "merged").exists()


def test_peft_derives_u_from_the_projection_it_recomputes(model_cache, tmp_path: Path) -> None:
    """Why: PEFT's U does not follow the saved V (doubling it in the file leaves U as it was)."""
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "FROD", target_modules=["q_proj"], progressbar=False)
    doubled = tmp_path / "doubled"
    shutil.copytree(adapter, doubled)
    tensors = load_file(str(doubled / "adapter_model.safetensors"))
    tensors["base_model.frod_V.self_attn_q_proj"] = tensors["base_model.frod_V.self_attn_q_proj"] * 2
    save_file(tensors, str(doubled / "adapter_model.safetensors"), metadata={"format": "pt"})

    def loaded(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        layer = PeftModel.from_pretrained(model, str(folder)).base_model.model.model.layers[0].self_attn.q_proj
        return layer.frod_U["default"].clone(), layer.frod_V["default"].clone()

    (u1, v1), (u2, v2) = loaded(adapter), loaded(doubled)
    assert torch.equal(v2, v1 * 2)
    assert torch.equal(u1, u2)
