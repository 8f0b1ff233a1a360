import pytest
import torch

from kernels import attention, attention_ref
from kernels.attention import attention_dropout_keep
from tests.kernels.conftest import ATOL, DEVICE, DTYPES, check_close

CASES = [  # (B, S, H, D, lengths): ragged lengths, a row with one real token, S not a block multiple
    (2, 77, 2, 64, [77, 1]),
    (1, 128, 2, 64, None),
    (2, 200, 2, 128, [200, 131]),
    (2, 33, 3, 32, [20, 33]),
]


def padding_mask(B, S, lengths):
    if lengths is None:
        return None
    m = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    for b, n in enumerate(lengths):
        m[b, :n] = True
    return m


def run_all(B, S, H, D, dtype, kpm=None, seg=None, dropout_p=0.0, seed=0, packed=True):
    qkv64 = torch.randn(B, S, 3, H, D, dtype=torch.float64, device=DEVICE)
    do64 = torch.randn(B, S, H, D, dtype=torch.float64, device=DEVICE)
    keep = attention_dropout_keep(seed, B, H, S, dropout_p, DEVICE) if dropout_p > 0 else None
    out = {}
    for name, dt in (("kernel", dtype), ("torch", dtype), ("ref", torch.float64)):
        qkv = qkv64.to(dt).requires_grad_()
        if packed:  # strided views of one packed (B, S, 3, H, D) projection, as the model does
            q, k, v = qkv.unbind(2)
        else:
            q, k, v = (t.contiguous() for t in qkv.unbind(2))
        if name == "kernel":
            o = attention(
                q, k, v, key_padding_mask=kpm, segment_ids=seg, dropout_p=dropout_p, dropout_seed=seed
            )
        else:
            o = attention_ref(q, k, v, key_padding_mask=kpm, segment_ids=seg, dropout_p=dropout_p, keep=keep)
        o.backward(do64.to(dt))
        out[name] = (o, qkv.grad)
    return out


def compare(out, dtype, S):
    atol = ATOL[dtype] * 4
    check_close(out["kernel"][0], out["torch"][0], out["ref"][0], atol, "out")
    for i, what in enumerate(("dq", "dk", "dv")):
        g = [out[n][1][:, :, i] for n in ("kernel", "torch", "ref")]
        check_close(g[0], g[1], g[2], atol * S**0.5, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, S, H, D, lengths", CASES, ids=lambda c: str(c))
def test_attention_forward_and_gradients(B, S, H, D, lengths, dtype):
    out = run_all(B, S, H, D, dtype, kpm=padding_mask(B, S, lengths))
    compare(out, dtype, S)
    assert out["kernel"][0].dtype == dtype


def test_contiguous_inputs_and_explicit_scale():
    q, k, v = (torch.randn(1, 40, 2, 64, device=DEVICE) for _ in range(3))
    assert torch.allclose(
        attention(q, k, v, softmax_scale=0.3), attention_ref(q, k, v, softmax_scale=0.3), atol=1e-5
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_document_mask_for_packed_sequences(dtype):
    B, S = 2, 96
    seg = torch.zeros(B, S, dtype=torch.long, device=DEVICE)
    seg[0, 30:] = 1
    seg[0, 70:] = 2
    seg[1, 50:] = 1
    kpm = padding_mask(B, S, [96, 90])
    out = run_all(B, S, 2, 64, dtype, kpm=kpm, seg=seg)
    compare(out, dtype, S)
    # and the document mask really isolates documents: changing document 0 leaves document 1 alone
    q, k, v = (torch.randn(1, S, 2, 64, device=DEVICE) for _ in range(3))
    s1 = seg[:1]
    base = attention(q, k, v, segment_ids=s1)
    k2 = k.clone()
    k2[:, :30] += 5
    assert torch.equal(attention(q, k2, v, segment_ids=s1)[:, 30:], base[:, 30:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_reference_with_the_same_mask(dtype):
    B, S, H = 2, 70, 2
    out = run_all(B, S, H, 64, dtype, kpm=padding_mask(B, S, [70, 40]), dropout_p=0.2, seed=99)
    compare(out, dtype, S)
    keep = attention_dropout_keep(99, B, H, S, 0.2, DEVICE)
    assert 0.77 < keep.float().mean().item() < 0.83


def test_sequence_without_real_tokens_stays_finite():
    q, k, v = (torch.randn(2, 20, 2, 64, device=DEVICE, requires_grad=True) for _ in range(3))
    kpm = padding_mask(2, 20, [20, 0])
    o = attention(q, k, v, key_padding_mask=kpm)
    o.sum().backward()
    for t in (o, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert torch.allclose(o[0], attention_ref(q, k, v, key_padding_mask=kpm)[0], atol=1e-5)


def test_unsupported_head_dim_is_a_clear_error():
    q = torch.randn(1, 8, 2, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 48 is not supported"):
        attention(q, q, q)
