"""Probes on a frozen RobertaMLM: held-out MLM loss/accuracy, cloze top-k, mean-pooled features and
a linear (logistic-regression) probe on them. Everything runs on CPU in seconds for the tiny preset."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from roberta_ds.config import DataConfig
from roberta_ds.data.masking import MLMCollator
from roberta_ds.errors import InputError
from roberta_ds.model import RobertaMLM, load_hf


@dataclass
class Loaded:
    """A model to evaluate, with its tokenizer and (for a run folder) training's validation batches."""

    model: RobertaMLM
    tokenizer: object
    name: str
    valid: MLMCollator | None = None  # None for a bare HF folder (no held-out split known)
    # metadata.json's settings of the first dataset: how prepare chose its held-out documents
    split_settings: dict | None = None


def load(path: str | Path) -> Loaded:
    """A run folder (its latest checkpoint, consolidated from the ZeRO shards) or a Hugging Face
    folder (config.json + weights + tokenizer)."""
    from transformers import AutoTokenizer

    from roberta_ds.config import load_run_config
    from roberta_ds.data.dataset import read_metadata
    from roberta_ds.export import consolidated_state_dict, tokenizer_dir
    from roberta_ds.training.checkpoint import resolve

    path = Path(path)
    cfg_path = path / "run_config.yaml"
    if not cfg_path.is_file():
        if not (path / "config.json").is_file():
            raise InputError(
                f"{path}: neither a run folder (run_config.yaml) nor a Hugging Face folder (config.json)"
            )
        model = load_hf(path)
        return Loaded(model.eval(), AutoTokenizer.from_pretrained(path), path.name)
    cfg = load_run_config(cfg_path)
    cfg.model.kernels = "torch"
    model = RobertaMLM(cfg.model)
    model.load_state_dict(consolidated_state_dict(resolve(str(path), path)))
    folders = dataset_folders(cfg.data)
    split_settings = read_metadata(folders[0])["settings"]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(path, yaml.safe_load(cfg_path.read_text())))
    valid = valid_collator(folders, cfg.train.seed, cfg.data)
    return Loaded(model.eval(), tok, path.name, valid, split_settings)


def dataset_folders(data: DataConfig) -> list[Path]:
    """The prepared folders a run read: the built-in corpus's cache folder, one folder, or every
    folder of a {folder: weight} mixture (they share tokenizer and seq_len; see data/mixture.py)."""
    from roberta_ds.data.corpus import builtin_dataset_dir

    if data.dataset == "builtin":
        return [builtin_dataset_dir(data.cache_dir, data.tokenizer, data.vocab_size, data.seq_len)]
    return data.folders


def valid_collator(folders: list[Path], seed: int, data: DataConfig | None = None) -> MLMCollator:
    """Training's validation batches (roberta_ds/training/builders.py): the valid splits, round robin
    for a mixture, masked with the run's masking settings and seed + 1."""
    from roberta_ds.data.dataset import read_metadata
    from roberta_ds.data.mixture import open_valid

    data = data or DataConfig()
    meta = read_metadata(folders[0])
    sp = meta["special_tokens"]
    return MLMCollator(
        open_valid(folders),
        meta["vocab_size"],
        sp["mask"],
        [sp["bos"], sp["pad"], sp["eos"], sp["unk"]],
        seed + 1,
        data.mlm_probability,
        data.mask_replace_prob,
        data.random_replace_prob,
        data.document_mask,
    )


def random_init_like(model: RobertaMLM, seed: int = 0) -> RobertaMLM:
    """The same config, freshly initialised (the probes' baseline)."""
    torch.manual_seed(seed)
    return RobertaMLM(model.cfg).eval()


@torch.no_grad()
def heldout_mlm(model: RobertaMLM, valid: MLMCollator, max_blocks: int = 512, batch: int = 16) -> dict:
    """MLM loss and masked accuracy over the first `max_blocks` validation blocks (`valid_collator`)."""
    n = min(len(valid), max_blocks)
    loss_sum = masked = correct = 0.0
    for start in range(0, n, batch):
        out = model(**valid([(q, q) for q in range(start, min(n, start + batch))]))
        m = out.num_masked.item()
        loss_sum, masked, correct = loss_sum + out.loss.item() * m, masked + m, correct + out.correct.item()
    loss = loss_sum / max(masked, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50)),
        "accuracy": correct / max(masked, 1),
        "blocks": n,
        "masked": int(masked),
    }


def _encode(tokenizer, texts: list[str], max_len: int = 128) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def fill_mask(model: RobertaMLM, tokenizer, texts: list[str], k: int = 5, batch: int = 64) -> list[list[int]]:
    """Top-k token ids at the (first) <mask> of each text."""
    out = []
    for i in range(0, len(texts), batch):
        enc = _encode(tokenizer, texts[i : i + batch])
        logits_BSV = model(**enc).logits
        is_mask_BS = enc["input_ids"] == tokenizer.mask_token_id
        if not is_mask_BS.any(1).all():
            raise ValueError("fill_mask: a text has no <mask> (or it was cut at 128 tokens)")
        pos_B = is_mask_BS.int().argmax(1)  # the first <mask>
        picked_BV = logits_BSV[torch.arange(len(pos_B)), pos_B]
        out += picked_BV.topk(k, dim=-1).indices.tolist()
    return out


def cloze(model: RobertaMLM, tokenizer, items: list[dict]) -> dict:
    """Top-1 / top-5 accuracy on the masked content words, overall and per source; predictions
    are kept per item (token strings) for the before/after table."""
    top = fill_mask(model, tokenizer, [it["text"] for it in items])
    res = {"n": len(items), "predictions": [], "predictions_ids": top}
    hits = {"all": [0, 0, 0]}
    for it, ids in zip(items, top):
        for key in ("all", it["source"]):
            h = hits.setdefault(key, [0, 0, 0])
            h[0] += ids[0] == it["answer_id"]
            h[1] += it["answer_id"] in ids
            h[2] += 1
        res["predictions"].append([tokenizer.decode([i]) for i in ids])
    for key, (t1, t5, n) in hits.items():
        suffix = "" if key == "all" else f"_{key}"
        res[f"top1{suffix}"], res[f"top5{suffix}"] = t1 / n, t5 / n
    return res


@torch.no_grad()
def features(model: RobertaMLM, tokenizer, texts: list[str], batch: int = 64) -> torch.Tensor:
    """Mean over real tokens of the last hidden states: (N, D) float32."""
    out = []
    for i in range(0, len(texts), batch):
        enc = _encode(tokenizer, texts[i : i + batch])
        h_BSD = model.encode(enc["input_ids"], enc["attention_mask"])
        m_BS1 = enc["attention_mask"].unsqueeze(-1).float()
        out.append((h_BSD * m_BS1).sum(1) / m_BS1.sum(1))
    return torch.cat(out)


def linear_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    weight_decay: float = 1e-3,
    steps: int = 200,
) -> float:
    """Multinomial logistic regression (L-BFGS, L2) on standardised frozen features; test accuracy."""
    mu, sd = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    classes = int(max(y_train.max(), y_test.max())) + 1
    lin = torch.nn.Linear(x_train.shape[1], classes).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    xt, xs = x_train.double(), x_test.double()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), y_train) + weight_decay * lin.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (lin(xs).argmax(-1) == y_test).double().mean().item()
