"""The fused LoRA / QLoRA step (training.fast_step) against the reference step: transformers' forward over holdall's
LoRA layers, ``loss.backward()`` — same loss, same adapter gradients — plus its pieces against plain torch math.

CPU tests run in float32 (agreement to float rounding); the CUDA tests (device machine) run the real bf16 path with
the Triton dequantize kernel and compile, against the same reference in bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from holdall.errors import ConfigError, UnsupportedModelError
from holdall.training.fast_step import FastStep, FastStepConfig, _Group, _GroupLinear, _Seed, lm_loss
from holdall.training.qlora import prepare_model
from holdall.tuners.lora import LoraConfig

HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None
cuda_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton (run on the device machine)"
)


def _model(kind: str = "llama", layers: int = 2, dtype=torch.float32, device="cpu", method="qlora",
           dropout=0.0, targets="all-linear", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=256)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model = model.to(device=device, dtype=dtype)
    prepare_model(model, method, LoraConfig(r=4, alpha=8, dropout=dropout, targets=targets),
                  gradient_checkpointing=False)
    # B = 0 at init makes every A gradient zero: give B values so both halves of the adapter are tested.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model


def _adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _reference(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), _adapter_grads(model)


def _fast(model, ids, labels, **config):
    model.zero_grad(set_to_none=True)
    loss = FastStep(model, FastStepConfig(**config))(ids, labels)
    return loss, _adapter_grads(model)


def _assert_close_grads(ref: dict, got: dict, rtol: float, atol: float):
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_matches_the_reference_step(kind, method):
    model = _model(kind, method=method)
    ids = torch.randint(0, 96, (2, 24))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not scored
    labels[1, -3:] = -100  # right padding
    ref_loss, ref = _reference(model, ids, labels)
    loss, got = _fast(model, ids, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_close_grads(ref, got, rtol=1e-4, atol=1e-6)


def test_chunking_changes_nothing():
    """MLP and loss chunks smaller than the sequence (and not dividing it) give the same loss and gradients."""
    model = _model(layers=3)
    ids = torch.randint(0, 96, (1, 37))
    ref_loss, ref = _reference(model, ids, ids)
    loss, got = _fast(model, ids, ids, mlp_chunk=5, loss_chunk=7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_close_grads(ref, got, rtol=1e-4, atol=1e-6)


def test_only_some_targets():
    """Adapters on q/v only (peft's classic choice): the other projections are frozen bases inside the groups."""
    model = _model(targets=("q_proj", "v_proj"))
    ids = torch.randint(0, 96, (1, 16))
    ref_loss, ref = _reference(model, ids, ids)
    loss, got = _fast(model, ids, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_close_grads(ref, got, rtol=1e-4, atol=1e-6)
    mlp_only = _model(targets=("down_proj",))  # layer 0's attention then has nothing to backpropagate
    ref_loss, ref = _reference(mlp_only, ids, ids)
    loss, got = _fast(mlp_only, ids, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_close_grads(ref, got, rtol=1e-4, atol=1e-6)


def _check_group_linear_with_dropout(device: str, dtype, seed: _Seed, keep_masks: bool = True, **tol):
    torch.manual_seed(1)
    lin = [torch.nn.Linear(16, n, bias=False).to(device, dtype) for n in (8, 4, 4)]
    loras = []
    for layer, p in zip(lin, (0.3, 0.0, 0.5)):
        from holdall.tuners.lora.layer import LoraLinear

        wrapped = LoraLinear(layer)
        wrapped.add_adapter("a", r=2, alpha=4, dropout=p, dtype=dtype)
        wrapped.lora_B["a"].weight.data.normal_()
        wrapped.active_adapters = ("a",)
        loras.append(wrapped)
    group = _Group(loras)
    x = torch.randn(5, 16, dtype=dtype, device=device, requires_grad=True)
    params = group.params()
    ys = _GroupLinear.apply(x, group, seed, keep_masks, *params)  # one output per member
    assert [tuple(y.shape) for y in ys] == [(5, 8), (5, 4), (5, 4)]
    y = torch.cat(ys, 1)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(ys, [x, *params], dy.split([8, 4, 4], 1))

    from holdall.training.fast_step import _dropout

    x2 = x.detach().clone().requires_grad_()
    outs = []
    for j, m in enumerate(loras):
        p = m.dropout["a"]
        ones = torch.ones_like(x2)
        xd = x2 * _dropout(ones, p, seed + j)  # the mask itself, as the kernel or the generator draws it
        outs.append(F.linear(x2, m.base_layer.weight)
                    + m.scaling["a"] * (xd @ m.lora_A["a"].weight.t()) @ m.lora_B["a"].weight.t())
    y_ref = torch.cat(outs, 1)
    torch.testing.assert_close(y, y_ref, **tol)
    want = torch.autograd.grad(y_ref, [x2, *params], dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    kept = (_dropout(torch.ones(4096, dtype=dtype, device=device), 0.3, seed) != 0).float().mean()
    assert 0.65 < float(kept) < 0.75  # the masks really drop ~p of the elements


def test_group_linear_with_dropout_against_autograd():
    """The hand-written backward (masks regenerated from the seed) against autograd of the same formula."""
    _check_group_linear_with_dropout("cpu", torch.float64, _Seed(123), keep_masks=True)  # the recompute's masks
    _check_group_linear_with_dropout("cpu", torch.float64, _Seed(123), keep_masks=False)  # regenerated


def test_lm_loss_is_cross_entropy():
    torch.manual_seed(2)
    hidden = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 9))
    labels[1, 2] = -100
    loss, grad = lm_loss(hidden.detach(), weight, labels, chunk=4)
    logits = hidden @ weight.t()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, hidden.grad)
    with pytest.raises(ConfigError, match="no position"):
        lm_loss(hidden.detach(), weight, torch.full_like(labels, -100), chunk=4)


def test_dropout_step_is_reproducible_and_trains():
    """With dropout the masks come from torch's seed: the same seed gives the same loss and gradients, and the
    loss with dropout differs from the loss without it (the masks are really applied)."""
    model = _model(dropout=0.3)
    ids = torch.randint(0, 96, (1, 16))
    torch.manual_seed(5)
    loss_a, grads_a = _fast(model, ids, ids)
    torch.manual_seed(5)
    loss_b, grads_b = _fast(model, ids, ids)
    assert torch.equal(loss_a, loss_b)
    _assert_close_grads(grads_a, grads_b, rtol=0, atol=0)
    for m in model.modules():
        if hasattr(m, "dropout") and isinstance(m.dropout, dict):
            m.dropout = {k: 0.0 for k in m.dropout}
    loss_c, _ = _fast(model, ids, ids)
    assert not torch.equal(loss_a, loss_c)


def test_refusals():
    model = _model()
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="lm_head"):
        FastStep(model)
    model = _model()
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="model.norm.weight"):
        FastStep(model)
    with pytest.raises(ConfigError, match="offload"):
        FastStepConfig(offload="disk")
    with pytest.raises(ConfigError, match="mlp_chunk"):
        FastStepConfig(mlp_chunk=0)
    with pytest.raises(ConfigError, match="memory_budget_gib"):
        FastStepConfig(memory_budget_gib=0)
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedModelError, match="gpt2"):
        FastStep(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)))
    with pytest.raises(ConfigError, match="labels"):
        FastStep(_model())(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_input_gradient_by_row_blocks_equals_one_gemm(monkeypatch):
    """Σ_blocks dy[:, rows] @ W[rows] over 128-row blocks of 4-bit weights == dy @ W, for a group of two."""
    from holdall.core.linear import QuantLinear
    from holdall.core.scheme import QuantScheme
    from holdall.kernels import dequant
    from holdall.training import fast_step

    torch.manual_seed(5)
    layers = [QuantLinear.from_linear(torch.nn.Linear(64, n, bias=False), QuantScheme(dtype="nf4", group_size=64,
                                                                                     double_quant=True))
              for n in (300, 40)]
    cpu = torch.device("cpu")
    monkeypatch.setattr(fast_step, "_GRAD_BLOCK_BYTES", 1)  # the smallest blocks: 128 rows
    # the plain-torch decoder decodes the whole weight per call: one block there, never one decode per block
    assert fast_step._row_blocks(layers[0], torch.float64, cpu) == [(0, 300)]
    monkeypatch.setattr(fast_step, "decodes_rows", lambda layer, device: True)  # as where the kernel runs
    assert fast_step._row_blocks(layers[0], torch.float64, cpu) == [(0, 128), (128, 256), (256, 300)]
    group = type("G", (), {"bases": layers})()
    dys = [torch.randn(7, 300, dtype=torch.float64), torch.randn(7, 40, dtype=torch.float64)]
    got = fast_step._base_input_grad(group, dys)
    want = sum(dy @ layer.dequantize_weight().double() for dy, layer in zip(dys, layers))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    rows = dequant.weight_rows(layers[0], torch.float32, cpu, 128, 256)
    torch.testing.assert_close(rows, layers[0].dequantize_weight().float()[128:256], rtol=0, atol=0)


# --- on the device -------------------------------------------------------------------------------------------------
@cuda_only
def test_dequant_kernel_matches_reference():
    from holdall.core.linear import QuantLinear
    from holdall.core.scheme import QuantScheme
    from holdall.kernels import dequant, packed

    torch.manual_seed(0)
    for scheme in (QuantScheme(dtype="nf4", group_size=64, double_quant=True), QuantScheme(dtype="nf4", group_size=64),
                   QuantScheme(), QuantScheme(symmetric=False), QuantScheme(granularity="channel", symmetric=False)):
        lin = torch.nn.Linear(512, 384, bias=False)
        layer = QuantLinear.from_linear(lin, scheme).cuda()
        assert dequant.use_kernel(layer, torch.device("cuda"))
        p = packed.plan(layer)
        want = packed.reference_decode(packed.operands(layer, p), p)
        for dtype in (torch.bfloat16, torch.float16):
            out = torch.full((400, 512), float("nan"), dtype=dtype, device="cuda")
            dequant.dequantize_into(layer, out[8:392])
            torch.testing.assert_close(out[8:392].float(), want.to(dtype).float(), rtol=0, atol=0, msg=scheme.label)
            assert out[:8].isnan().all() and out[392:].isnan().all()  # nothing written outside its rows
            # a block of rows (the input gradient's path): row 130 is inside an absmax block of 256 scales
            rows = dequant.weight_rows(layer, dtype, torch.device("cuda"), 130, 301)
            torch.testing.assert_close(rows.float(), want[130:301].to(dtype).float(), rtol=0, atol=0,
                                       msg=scheme.label)


@cuda_only
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_cuda_bf16_step_matches_the_reference(method):
    model = _model(layers=3, dtype=torch.bfloat16, device="cuda", method=method)
    ids = torch.randint(0, 96, (1, 200), device="cuda")
    ref_loss, ref = _reference(model, ids, ids)
    for offload in ("none", "cpu"):
        loss, got = _fast(model, ids, ids, offload=offload, mlp_chunk=64)
        torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=2e-3)
        for name in ref:
            cos = F.cosine_similarity(got[name].flatten().double(), ref[name].flatten().double(), dim=0)
            assert cos > 0.995, (name, float(cos))
            rel = (got[name] - ref[name]).norm() / ref[name].norm()
            assert rel < 0.1, (name, float(rel))


@cuda_only
def test_cuda_dropout_kernel_group_linear():
    """The Triton dropout (seed read from device memory) regenerates the forward's masks in backward."""
    seed = _Seed(0, torch.tensor([123], dtype=torch.int64, device="cuda"))
    _check_group_linear_with_dropout("cuda", torch.float32, seed, rtol=1e-4, atol=1e-5)


@cuda_only
def test_cuda_graphs_match_the_eager_step():
    """Two steps with an optimizer update between them: graphed and eager give the same losses and gradients
    (same torch seed, so the same dropout masks), and a caller's set_to_none between steps is honoured."""
    from holdall.training.optim import FusedAdamW8bit

    results = []
    for graphs, offload in ((False, "none"), (True, "none"), (True, "cpu")):
        model = _model(layers=3, dtype=torch.bfloat16, device="cuda", dropout=0.1)
        fast = FastStep(model, FastStepConfig(cuda_graphs=graphs, offload=offload))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = FusedAdamW8bit(params, lr=1e-3)
        ids = torch.randint(0, 96, (1, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        torch.manual_seed(7)
        losses, grads = [], None
        for _ in range(3):
            losses.append(float(fast(ids)))
            grads = [p.grad.detach().clone() for p in params]
            opt.step()
            opt.zero_grad(set_to_none=True)
        results.append((losses, grads))
    (eager_losses, eager_grads), *graphed = results
    assert eager_losses[0] != eager_losses[2]  # the adapters trained
    for graph_losses, graph_grads in graphed:  # checkpoints on the device, then through two buffers + CPU
        torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-3, atol=1e-3)
        for g, e in zip(graph_grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=2e-2, atol=1e-4)


def test_padding_rules():
    model = _model()
    fast = FastStep(model)
    ids = torch.randint(0, 96, (2, 8))
    labels = ids.clone()
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with pytest.raises(ConfigError, match="label -100"):
        fast(ids, labels, mask)
    labels[1, 6:] = -100
    fast(ids, labels, mask)  # right padding with unscored pads: fine
    mask[0, 0] = 0
    with pytest.raises(ConfigError, match="right padding"):
        fast(ids, labels, mask)


def test_grad_scale_scales_the_gradients_only():
    model = _model()
    ids = torch.randint(0, 96, (1, 12))
    loss_a, grads_a = _fast(model, ids, ids)
    model.zero_grad(set_to_none=True)
    loss_b = FastStep(model)(ids, ids, grad_scale=0.25)
    grads_b = _adapter_grads(model)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name] * 0.25, rtol=1e-5, atol=1e-8)


def test_eval_mode_turns_dropout_off_like_the_reference():
    model = _model(dropout=0.3)
    model.eval()
    ids = torch.randint(0, 96, (1, 16))
    ref_loss, ref = _reference(model, ids, ids)
    loss, got = _fast(model, ids, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_close_grads(ref, got, rtol=1e-4, atol=1e-6)


def test_trainer_refuses_an_unsupported_setup_before_any_step(tmp_path):
    """Trainer(fast_step=True) builds the step at once: a trainable non-adapter parameter is refused up front."""
    from holdall.training.data import Example
    from holdall.training.trainer import Trainer, TrainerConfig

    model = _model()
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="model.norm.weight"):
        Trainer(model, [Example([1, 2, 3], [1, 2, 3])], None, TrainerConfig(fast_step=True, progress=False), tmp_path)
