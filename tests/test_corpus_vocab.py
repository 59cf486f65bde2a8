"""toygpt/corpus_vocab.py: training on the ids the corpus uses plus one shared row is exactly training the full-vocabulary
model whose unseen rows all equal that row: the same loss, gradients, clipped optimizer step and evaluation."""

import math

import pytest
import torch

from configuration_toygpt import ToyGPTConfig
from toygpt.corpus_vocab import CorpusVocab, choose
from toygpt.training_loss import CausalLMLoss

V = 64
SEEN = [0, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61]  # 19 of 64 ids


def models(seed=0):
    """A random compact model (u random too: any u must work) in fp64, and the full model it stands for."""
    torch.manual_seed(seed)
    from modeling_toygpt import ToyGPTForCausalLM

    config = ToyGPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=16, block_size=16, bos_token_id=0, eos_token_id=0)
    vocab = CorpusVocab(SEEN, V)
    compact = ToyGPTForCausalLM(vocab.compact_config(config)).double().train()
    full = vocab.expand(compact, config).double().train()
    return vocab, compact, full


def batch(generator_seed=1, unseen_targets=False):
    """Training batches hold seen ids only (they come from the training split); validation ones may not."""
    g = torch.Generator().manual_seed(generator_seed)
    x = torch.tensor(SEEN)[torch.randint(0, len(SEEN), (3, 12), generator=g)]
    y = torch.tensor(SEEN)[torch.randint(0, len(SEEN), (3, 12), generator=g)]
    y[0, 3] = -100  # an ignored target
    if unseen_targets:
        y[0, :3] = torch.tensor([1, 4, 63])  # targets that never occur in training
    return x, y


def test_expand_puts_seen_rows_in_place_and_u_in_every_unseen_row():
    vocab, compact, full = models()
    wte, rows = full.transformer.wte.weight, compact.transformer.wte.weight
    assert torch.equal(wte[SEEN], rows[:len(SEEN)])
    unseen = [i for i in range(V) if i not in SEEN]
    assert torch.equal(wte[unseen], rows[vocab.u].expand(len(unseen), -1))
    assert full.lm_head.weight is full.transformer.wte.weight  # still tied
    assert vocab.compact(torch.tensor([0, 1, 61, -100])).tolist() == [0, vocab.u, 18, -100]


def test_loss_and_gradients_equal_the_full_models():
    vocab, compact, full = models()
    x, y = batch()
    loss_c = CausalLMLoss(compact, vocab=vocab)(x, y)  # the fused training path, chunked
    loss_f = CausalLMLoss(full)(x, y)
    assert abs(loss_c.item() - loss_f.item()) < 1e-9
    loss_c.backward()
    loss_f.backward()
    g_c, g_f = compact.transformer.wte.weight.grad, full.transformer.wte.weight.grad
    torch.testing.assert_close(g_c[:len(SEEN)], g_f[SEEN], rtol=0, atol=1e-9)
    unseen = [i for i in range(V) if i not in SEEN]
    torch.testing.assert_close(g_c[vocab.u], g_f[unseen].sum(0), rtol=0, atol=1e-9)  # autograd: the sum
    full_params = dict(full.named_parameters())
    for name, p in compact.named_parameters():
        if name != "transformer.wte.weight":
            torch.testing.assert_close(p.grad, full_params[name].grad, rtol=0, atol=1e-9, msg=name)
    full_norm = torch.nn.utils.get_total_norm([p.grad for p in full.parameters()])
    vocab.to_per_row_gradient(compact)
    torch.testing.assert_close(g_c[vocab.u], g_f[unseen[0]], rtol=0, atol=1e-9)  # each unseen row's
    assert abs(vocab.grad_norm(compact, list(compact.parameters())).item() - full_norm.item()) < 1e-9


def test_a_clipped_adamw_step_keeps_the_compact_model_the_full_model():
    vocab, compact, full = models()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (compact, full)]
    for step in range(3):
        x, y = batch(step + 10)
        CausalLMLoss(compact, vocab=vocab)(x, y).backward()
        CausalLMLoss(full)(x, y).backward()
        vocab.to_per_row_gradient(compact)
        norms = [vocab.grad_norm(compact, list(compact.parameters())),
                 torch.nn.utils.get_total_norm([p.grad for p in full.parameters()])]
        for model, norm, optimizer in zip((compact, full), norms, optimizers):
            torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), 0.05, norm)  # clipping is active
            optimizer.step()
            optimizer.zero_grad()
    expanded = vocab.expand(compact, full.config)
    for name, tensor in full.state_dict().items():
        torch.testing.assert_close(expanded.state_dict()[name], tensor, rtol=0, atol=1e-9, msg=name)


def test_evaluation_with_unseen_inputs_and_targets_equals_the_full_models():
    """Validation text has ids the training split never used, as inputs and as targets: scored through u."""
    vocab, compact, full = models()
    x, y = batch(unseen_targets=True)
    x[1, :3] = torch.tensor([1, 4, 63])  # unseen inputs: the full model embeds them with u
    with torch.no_grad():
        total_c = CausalLMLoss(compact, vocab=vocab)(x, y, reduction="sum")
        total_f = CausalLMLoss(full)(x, y, reduction="sum")
        logits = full(x).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    assert abs(total_c.item() - total_f.item()) < 1e-9 and abs(total_f.item() - expected.item()) < 1e-9


def test_u_counts_once_per_unseen_id_in_the_normaliser():
    vocab = CorpusVocab(SEEN, V)
    assert vocab.n_unseen == V - len(SEEN) and vocab.logit_offset[vocab.u] == pytest.approx(math.log(V - len(SEEN)))
    assert vocab.logit_offset[:vocab.u].abs().sum() == 0
    assert CorpusVocab.from_state_dict(vocab.state_dict()).seen_ids.tolist() == SEEN


def test_auto_uses_the_corpus_vocabulary_only_when_it_is_exact_and_worth_it():
    assert choose("auto", 11_234 / 50_257, fine_tuning=False)
    assert not choose("auto", 0.6, fine_tuning=False)
    assert not choose("auto", 0.2, fine_tuning=True)  # GPT-2's unseen rows differ: only the full vocabulary is exact
    assert choose("corpus", 0.9, fine_tuning=False) and not choose("full", 0.1, fine_tuning=False)
