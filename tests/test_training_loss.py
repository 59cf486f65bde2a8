"""toygpt/training_loss.py: the chunked, fused lm_head + cross-entropy equals the plain loss, its gradients and the
model's own loss; evaluation through it keeps the head's memory at one chunk."""

import pytest
import torch
import torch.nn.functional as F

from toygpt import training_loss
from conftest import small_config
from modeling_toygpt import ToyGPTForCausalLM
from toygpt.training_loss import CausalLMLoss, FusedLinearCrossEntropy


def make_model(**overrides):
    torch.manual_seed(0)
    return ToyGPTForCausalLM(small_config(**overrides))


def test_fused_linear_cross_entropy_matches_plain_path():
    torch.manual_seed(0)
    N, C, V = 23, 32, 1000
    h0, w0 = torch.randn(N, C), torch.randn(V, C) * 0.3
    targets = torch.randint(0, V, (N,))
    targets[[0, 5, 6, 22]] = -100
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    expected = F.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    (expected * 0.5).backward()  # a grad_output other than 1, as with gradient accumulation
    for chunk_rows in (5, 7, 23, 64):  # 5 and 7 do not divide 23
        fh, fw = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = FusedLinearCrossEntropy.apply(fh, fw, targets, -100, chunk_rows)
        (loss * 0.5).backward()
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(fh.grad, h.grad, rtol=0, atol=1e-5)
        torch.testing.assert_close(fw.grad, w.grad, rtol=0, atol=1e-5)


def test_fused_linear_cross_entropy_under_bf16_autocast_takes_bf16_products_fp32_softmax():
    # The GPU path (--dtype bfloat16): each chunk's logits product in bf16, copied into the fp32 buffer.
    torch.manual_seed(0)
    N, C, V = 23, 32, 1000
    h0, w0 = torch.randn(N, C), torch.randn(V, C) * 0.3
    targets = torch.randint(0, V, (N,))
    h, w = h0.bfloat16().requires_grad_(), w0.bfloat16().requires_grad_()
    expected = F.cross_entropy((h @ w.t()).float(), targets)
    expected.backward()
    fh, fw = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FusedLinearCrossEntropy.apply(fh, fw, targets, -100, 7)
    loss.backward()
    assert loss.dtype == torch.float32 and fh.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(fh.grad, h.grad.float(), rtol=0, atol=2e-3)
    torch.testing.assert_close(fw.grad, w.grad.float(), rtol=0, atol=2e-3)


@pytest.mark.parametrize("use_shift_labels", [False, True])
def test_training_loss_equals_the_models_loss_and_gradients(monkeypatch, use_shift_labels):
    monkeypatch.setattr(training_loss, "CHUNK_ROWS", 5)  # 2 x 12 (or 11) rows: uneven chunks
    model = make_model()
    input_ids = torch.randint(0, 50257, (2, 12))
    if use_shift_labels:  # train.py's windows: x = w[:, :-1], y = w[:, 1:], every position a target
        inputs, targets = input_ids[:, :-1], input_ids[:, 1:].clone()
        targets[1, :3] = -100
        model_kwargs = {"shift_labels": targets}
    else:  # labels are the inputs: position t predicts token t+1
        labels = input_ids.clone()
        labels[0, :4] = -100
        inputs, targets, model_kwargs = input_ids[:, :-1], labels[:, 1:], {"labels": labels}

    def grads():
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    model.train()  # small_config has dropout 0: train and eval compute the same
    fused = CausalLMLoss(model)(inputs, targets)
    fused.backward()
    fused_grads = grads()
    model.zero_grad(set_to_none=True)
    plain = model(input_ids if not use_shift_labels else inputs, use_cache=False, **model_kwargs)
    plain.loss.backward()
    torch.testing.assert_close(fused, plain.loss, rtol=0, atol=1e-5)
    assert fused_grads.keys() == grads().keys()
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, grads()[name], rtol=0, atol=1e-5, msg=name)
    with torch.no_grad():  # evaluation: the head in chunks, summed
        total = CausalLMLoss(model)(inputs, targets, reduction="sum")
        torch.testing.assert_close(total / (targets != -100).sum(), plain.loss, rtol=0, atol=1e-5)
