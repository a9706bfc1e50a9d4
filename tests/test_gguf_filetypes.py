"""File types: holdall picks every tensor's ggml type exactly as llama.cpp's llama-quantize does, and (with the
non-calibrated encoders) writes the same bytes.

The reference is ``llama_model_quantize`` run on holdall's own F16 export of the same model; both files are read
with gguf.GGUFReader. Shapes: hidden 256 with 16 layers (every per-layer rule fires: use_more_bits, the first
n/8 and n/16 layers), a 2-layer one, SmolLM2's hidden 576, where no row is a multiple of 256 and the fallbacks
apply, and a Qwen2 (biases, qwen2 architecture). Every quantized file holdall writes here is also loaded by
llama.cpp and generates tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf_helpers import (
    hf_tokenizer_from_spm,
    llama_model,
    llama_quantize,
    need_encoders,
    read_gguf,
    read_gguf_fast,
    require_llama_cpp,
    tiny_llama,
    tiny_qwen2,
    train_spm,
)

from holdall.errors import ConfigError
from holdall.formats.gguf.export import export_gguf, gguf_tensor_types
from holdall.formats.gguf.filetypes import (
    FILE_TYPES,
    ModelShape,
    get_file_type,
    llama_cpp_order,
    plan_tensor_types,
    use_more_bits,
)

pytest.importorskip("gguf")

QUANTIZED = [name for name, ft in FILE_TYPES.items() if ft.is_quantized]
# name -> (model factory, whether holdall's own export is also encoded and compared byte for byte).
# The 16-layer model exercises every per-layer rule; bytes do not depend on depth, so they are checked on
# the two small models only, which keeps the file fast.
SMALL = dict(hidden=256, layers=2, intermediate=256, heads=8, kv_heads=2, tie=False)
DEEP = dict(hidden=256, layers=16, intermediate=256, heads=8, kv_heads=2, tie=False)
SMOLLM2_WIDTH = dict(hidden=576, layers=1, intermediate=576, heads=9, kv_heads=3, tie=True)
MODELS = {
    "h256-16layers": (lambda: tiny_llama(vocab=1000, **DEEP), False),
    "h256-2layers": (lambda: tiny_llama(vocab=1000, **SMALL), True),
    "h576-tied": (lambda: tiny_llama(vocab=1000, **SMOLLM2_WIDTH), True),
    "qwen2": (lambda: tiny_qwen2(vocab=1000), False),
}


# ------------------------------------------------------------------------------------------- unit


def test_file_type_lookup():
    assert get_file_type("q4_k_m") is FILE_TYPES["Q4_K_M"]
    assert get_file_type(FILE_TYPES["Q8_0"]).ftype == 7
    with pytest.raises(ConfigError, match="Q4_K_M"):
        get_file_type("Q4_K_XL")
    assert not FILE_TYPES["F16"].is_quantized and FILE_TYPES["Q2_K"].is_quantized


def test_ftype_values_are_llama_cpps():
    llama_cpp = require_llama_cpp()
    for name, ft in FILE_TYPES.items():
        constant = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(llama_cpp, constant) == ft.ftype, name


def test_use_more_bits():
    # first and last eighth, then every third layer from n/8 on
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_visiting_order_is_by_layer_number():
    names = ["blk.10.attn_v.weight", "output.weight", "blk.2.attn_v.weight", "token_embd.weight", "blk.2.attn_k.weight"]
    assert llama_cpp_order(names) == [
        "output.weight", "token_embd.weight", "blk.2.attn_k.weight", "blk.2.attn_v.weight", "blk.10.attn_v.weight"]


def test_rows_of_no_block_size_have_no_legacy_fallback():
    with pytest.raises(ConfigError, match="no fallback"):
        plan_tensor_types([("blk.0.attn_q.weight", (64, 48))], "Q4_0", ModelShape("llama", 1, 4, 4))


def test_shipped_smollm2_file_types_are_reproduced():
    """SmolLM2-135M-Instruct.Q4_1.gguf was made by llama-quantize: 30 layers of 576, tied, 9/3 heads."""
    from holdall.errors import MissingDependencyError
    from holdall.models import resolve_model

    try:
        path = Path(resolve_model("smollm2").location)
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    fields, tensors = read_gguf_fast(path)
    shape = ModelShape("llama", fields["llama.block_count"], fields["llama.attention.head_count"],
                       fields["llama.attention.head_count_kv"])
    numpy_shapes = [(name, tuple(reversed(ne))) for name, (_, ne, _) in tensors.items()]
    plan = plan_tensor_types(numpy_shapes, "Q4_1", shape)
    assert plan.types == {name: qtype for name, (qtype, _, _) in tensors.items()}
    assert plan.n_fallback == 1  # the tied token_embd: Q6_K wanted, rows of 576, Q8_0 written


# --------------------------------------------------------------------------- against llama_model_quantize


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    return hf_tokenizer_from_spm(train_spm(tmp_path_factory.mktemp("spm")))


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def reference(request, tmp_path_factory, spm_tok):
    """(model, holdall's F16 export of it, compare bytes?): llama-quantize's input is an F16 GGUF."""
    require_llama_cpp()
    need_encoders("F32", "F16")
    build, compare_bytes = MODELS[request.param]
    model = build()
    folder = tmp_path_factory.mktemp(request.param)
    f16 = export_gguf(model, folder / "f16.gguf", "F16", tokenizer=spm_tok, progress=False)
    return model, f16, compare_bytes


@pytest.mark.parametrize("file_type", QUANTIZED)
def test_types_and_bytes_match_llama_quantize(reference, spm_tok, tmp_path, file_type):
    model, f16, compare_bytes = reference
    ft = FILE_TYPES[file_type]
    n_fallback = llama_quantize(f16, tmp_path / "llama.gguf", ft.ftype)
    theirs_fields, theirs = read_gguf(tmp_path / "llama.gguf")

    plan = gguf_tensor_types(model, file_type)
    assert plan.types == {name: qtype for name, (qtype, _, _) in theirs.items()}
    assert plan.n_fallback == n_fallback
    assert len(set(plan.types.values())) > 1  # a real mix: F32 norms at least
    if not compare_bytes:
        return

    need_encoders(*plan.types.values())
    ours_path = export_gguf(model, tmp_path / "ours.gguf", file_type, tokenizer=spm_tok, progress=False)
    ours_fields, ours = read_gguf(ours_path)
    assert ours_fields["general.file_type"] == theirs_fields["general.file_type"] == ft.ftype
    different = [name for name in theirs if ours[name] != theirs[name]]
    assert not different, f"{len(different)} tensors differ from llama.cpp's, e.g. {different[:3]}"
    _generates(ours_path)


def _generates(path: Path, n: int = 4) -> None:
    """Loads in llama.cpp and greedily generates ``n`` tokens."""
    llm = llama_model(path)
    try:
        prompt = llm.tokenize(b"The history of the city", add_bos=True)
        generated = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            generated.append(token)
            if len(generated) == n:
                break
        assert len(generated) == n and all(0 <= t < llm.n_vocab() for t in generated)
    finally:
        llm.close()


@pytest.mark.parametrize("file_type", ["F32", "F16", "BF16"])
def test_float_file_types_load_and_generate(spm_tok, tmp_path, file_type):
    require_llama_cpp()
    need_encoders("F32", file_type)
    model = tiny_llama(vocab=1000, **SMALL)
    path = export_gguf(model, tmp_path / "m.gguf", file_type, tokenizer=spm_tok, progress=False)
    fields, tensors = read_gguf(path)
    assert fields["general.file_type"] == FILE_TYPES[file_type].ftype
    assert {qtype for name, (qtype, ne, _) in tensors.items() if len(ne) == 2} == {file_type}
    _generates(path)


@pytest.mark.parametrize("file_type", ["Q4_0", "Q4_K_M"])
def test_imatrix_matches_llama_quantize(reference, spm_tok, tmp_path, file_type):
    """With an importance matrix: the same types (Q4_0 guards the first ffn_down layers) and the same bytes."""
    model, f16, compare_bytes = reference
    from holdall.formats.gguf.convert import convert_model

    rng = np.random.default_rng(0)
    importance = {  # every matmul input, as llama-imatrix collects it (never the embedding lookup)
        t.name: rng.uniform(0.1, 4.0, t.shape[-1]).astype(np.float32)
        for t in convert_model(model).tensors
        if len(t.shape) == 2 and t.name != "token_embd.weight"
    }
    llama_quantize(f16, tmp_path / "llama.gguf", FILE_TYPES[file_type].ftype, imatrix=importance)
    _, theirs = read_gguf(tmp_path / "llama.gguf")
    with_imatrix = gguf_tensor_types(model, file_type, has_imatrix=True)
    assert with_imatrix.types == {name: qtype for name, (qtype, _, _) in theirs.items()}
    if not compare_bytes:
        return

    need_encoders(*with_imatrix.types.values())
    path = export_gguf(model, tmp_path / "ours.gguf", file_type, tokenizer=spm_tok, imatrix=importance, progress=False)
    _, ours = read_gguf(path)
    different = [name for name in theirs if ours[name] != theirs[name]]
    assert not different, f"{len(different)} tensors differ from llama.cpp's, e.g. {different[:3]}"



@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 8], ids=["gqa-70b", "mha-65b"])
def test_80_layer_models_get_the_70b_rule(spm_tok, tmp_path, kv_heads):
    """llama.cpp labels an 80-layer llama with grouped-query attention 70B and gives its attn_v more bits."""
    require_llama_cpp()
    need_encoders("F32", "F16")
    model = tiny_llama(vocab=1000, hidden=256, layers=80, intermediate=256, heads=8, kv_heads=kv_heads)
    f16 = export_gguf(model, tmp_path / "f16.gguf", "F16", tokenizer=spm_tok, progress=False)
    for file_type in ("Q3_K_M", "Q2_K"):
        llama_quantize(f16, tmp_path / "llama.gguf", FILE_TYPES[file_type].ftype)
        _, theirs = read_gguf(tmp_path / "llama.gguf")
        assert gguf_tensor_types(model, file_type).types == {name: t for name, (t, _, _) in theirs.items()}
        attn_v = {t for name, (t, _, _) in theirs.items() if "attn_v" in name}
        assert (attn_v == {"Q5_K"}) == (kv_heads == 2)
