"""Our RobertaMLM against transformers' RobertaForMaskedLM, weight for weight."""

import pytest
import torch
from transformers import AutoModelForMaskedLM, RobertaConfig, RobertaForMaskedLM, pipeline

import roberta_ds
from roberta_ds.data.tokenizer import train_bpe

SIZES = [  # (hidden, layers, heads, intermediate, vocab): odd hidden sizes and head counts too
    (32, 1, 2, 64, 120),
    (36, 2, 3, 70, 101),
    (60, 3, 5, 150, 257),
    (64, 2, 1, 128, 99),
]


def hf_model(hidden, layers, heads, inter, vocab, type_vocab=1):
    cfg = RobertaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=66,
        type_vocab_size=type_vocab,
    )
    m = RobertaForMaskedLM(cfg).eval()
    with torch.no_grad():  # randomise LayerNorms and biases too, which init leaves at 1 and 0
        for name, p in m.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def padded_batch(vocab, lengths, seq):
    ids = torch.randint(4, vocab, (len(lengths), seq))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, 0], ids[b, n - 1] = 0, 2
        ids[b, n:] = 1
        mask[b, :n] = 1
    return ids, mask


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_logits_equal_after_load_and_save(size, tmp_path):
    hf = hf_model(*size)
    ids, mask = padded_batch(size[-1], [19, 7, 1, 12], 19)  # one row of a single real token
    ours = roberta_ds.load_hf(hf).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5

    roberta_ds.save_hf(ours, tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids, attention_mask=mask).logits
    assert (again - ref).abs().max().item() <= 1e-5


def test_load_hf_from_folder_with_two_token_types(tmp_path):
    hf = hf_model(32, 1, 2, 64, 120, type_vocab=2)  # transformers' default type_vocab_size is 2
    hf.save_pretrained(tmp_path)
    ours = roberta_ds.load_hf(str(tmp_path)).eval()
    ids, mask = padded_batch(120, [10, 6], 10)
    with torch.no_grad():
        assert (ours(ids, mask).logits - hf(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-5


def test_masked_only_loss_equals_full_logits_loss():
    hf = hf_model(36, 2, 3, 70, 101)
    ours = roberta_ds.load_hf(hf).eval()
    ids, mask = padded_batch(101, [16, 9, 13], 16)
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape) < 0.3) & mask.bool()
    labels[pick] = torch.randint(4, 101, (int(pick.sum()),))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        out = ours(ids, mask, labels)
    assert torch.allclose(out.loss, ref, atol=1e-6, rtol=1e-6)
    assert out.logits is None  # with labels, no (tokens, vocab) logits are returned
    assert out.num_masked.item() == int(pick.sum())


def test_masked_loss_gradients_equal_hf():
    hf = hf_model(32, 1, 2, 64, 120)
    hf.config.hidden_dropout_prob = hf.config.attention_probs_dropout_prob = 0.0
    ours = roberta_ds.load_hf(hf)
    hf.eval(), ours.eval()
    ids, mask = padded_batch(120, [12, 5], 12)
    labels = torch.where(torch.rand(ids.shape) < 0.4, ids, torch.full_like(ids, -100))
    labels[~mask.bool()] = -100
    hf(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(ids, mask, labels).loss.backward()
    ref = hf.roberta.embeddings.word_embeddings.weight.grad
    assert torch.allclose(ours.embeddings.word.weight.grad, ref, atol=1e-6)
    q_ref = hf.roberta.encoder.layer[0].attention.self.query.weight.grad
    assert torch.allclose(ours.layers[0].qkv.weight.grad[:32], q_ref, atol=1e-6)


def test_no_masked_token_gives_finite_zero_loss():
    ours = roberta_ds.RobertaMLM(roberta_ds.model_preset("tiny", vocab_size=300))
    ids, mask = padded_batch(300, [8, 4], 8)
    out = ours(ids, mask, torch.full_like(ids, -100))
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    out.loss.backward()  # and the graph still runs backward
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


def test_fill_mask_pipeline_on_saved_folder(tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "In the beginning was the word."] * 40
    tok = train_bpe(texts, vocab_size=320)
    hf = hf_model(32, 1, 2, 64, len(tok))
    roberta_ds.save_hf(roberta_ds.load_hf(hf), tmp_path, tokenizer=tok)
    fill = pipeline("fill-mask", model=str(tmp_path), tokenizer=str(tmp_path))
    preds = fill("The quick brown <mask> jumps.")
    assert len(preds) == 5 and all("token_str" in p for p in preds)


def test_backend_switch_rejects_triton_without_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ours = roberta_ds.RobertaMLM(roberta_ds.model_preset("tiny", vocab_size=300, kernels="triton"))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        ours(torch.randint(4, 300, (1, 8)))
