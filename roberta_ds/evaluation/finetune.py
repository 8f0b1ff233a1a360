"""Sequence-classification fine-tuning of an exported Hugging Face folder
(AutoModelForSequenceClassification), the median over seeds. One code path serves GLUE (RTE, MRPC,
CoLA, STS-B, SST-2 through `datasets`, needs a network the first time) and the offline corpus task
(corpus_tasks.source_task as a `datasets.Dataset`), so the offline test exercises the GLUE runner."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TaskSpec:
    text_a: str
    text_b: str | None
    num_labels: int  # 1 = regression (STS-B)
    metric: str  # accuracy | f1 | mcc | pearson


GLUE = {
    "rte": TaskSpec("sentence1", "sentence2", 2, "accuracy"),
    "mrpc": TaskSpec("sentence1", "sentence2", 2, "f1"),
    "cola": TaskSpec("sentence", None, 2, "mcc"),
    "stsb": TaskSpec("sentence1", "sentence2", 1, "pearson"),
    "sst2": TaskSpec("sentence", None, 2, "accuracy"),
}
CORPUS_SOURCE = TaskSpec("text", None, 3, "accuracy")


def default_lr(hidden_size: int) -> float:
    """Fine-tuning lr by model width: RoBERTa's GLUE sweep (1e-5..3e-5) picks 2e-5 for base and
    large; the tiny preset (hidden 128) learns nothing in a few epochs at 2e-5 and wants ~1e-3."""
    return 1e-3 if hidden_size <= 256 else 2e-5


def model_width(model_dir: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).hidden_size


def score(metric: str, pred: np.ndarray, gold: np.ndarray) -> float:
    if metric == "accuracy":
        return float((pred == gold).mean())
    if metric == "pearson":
        return float(np.corrcoef(pred, gold)[0, 1]) if pred.std() > 0 else 0.0
    tp, fp = float(((pred == 1) & (gold == 1)).sum()), float(((pred == 1) & (gold == 0)).sum())
    fn, tn = float(((pred == 0) & (gold == 1)).sum()), float(((pred == 0) & (gold == 0)).sum())
    if metric == "f1":
        return 2 * tp / max(2 * tp + fp + fn, 1)
    if metric == "mcc":
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return (tp * tn - fp * fn) / den if den else 0.0
    raise ValueError(f"unknown metric {metric!r}")


def glue_splits(task: str):
    """(train, validation) `datasets.Dataset`s of a GLUE task (downloads on first use)."""
    import datasets

    ds = datasets.load_dataset("nyu-mll/glue", task)
    return ds["train"], ds["validation"]


def corpus_splits(task: dict):
    """corpus_tasks.source_task's rows as `datasets.Dataset`s with GLUE's column layout."""
    import datasets

    return tuple(
        datasets.Dataset.from_dict({"text": [t for t, _ in task[s]], "label": [y for _, y in task[s]]})
        for s in ("train", "test")
    )


def _batches(ds, spec: TaskSpec, tokenizer, batch: int, max_len: int, order=None):
    idx = order if order is not None else np.arange(len(ds))
    for i in range(0, len(idx), batch):
        rows = ds[idx[i : i + batch].tolist()]  # a datasets.Dataset: {column: [values]}
        args = [rows[spec.text_a]] + ([rows[spec.text_b]] if spec.text_b else [])
        enc = tokenizer(*args, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        enc.pop("token_type_ids", None)
        dtype = torch.float32 if spec.num_labels == 1 else torch.long
        yield enc, torch.tensor(rows["label"], dtype=dtype)


def finetune(
    model_dir: str,
    spec: TaskSpec,
    train_ds,
    eval_ds,
    seed: int,
    epochs: int = 3,
    lr: float = 2e-5,
    batch: int = 32,
    max_len: int = 128,
    warmup: float = 0.06,
) -> float:
    """Fine-tune the whole model (AdamW, linear warmup then decay) and return the eval metric."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new classifier head's "newly initialized" report, per seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=spec.num_labels)
    total = epochs * math.ceil(len(train_ds) / batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    model.train()
    for _ in range(epochs):
        for enc, y in _batches(train_ds, spec, tok, batch, max_len, rng.permutation(len(train_ds))):
            loss = model(**enc, labels=y).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    model.eval()
    preds, gold = [], []
    with torch.no_grad():
        for enc, y in _batches(eval_ds, spec, tok, 128, max_len):
            logits = model(**enc).logits
            preds.append(logits[:, 0] if spec.num_labels == 1 else logits.argmax(-1))
            gold.append(y)
    return score(spec.metric, torch.cat(preds).numpy(), torch.cat(gold).numpy())


def finetune_median(model_dir: str, spec: TaskSpec, train_ds, eval_ds, seeds: int = 5, **kw) -> dict:
    """RoBERTa's GLUE protocol: the median over `seeds` fine-tuning runs (and every run's score)."""
    scores = [finetune(model_dir, spec, train_ds, eval_ds, seed, **kw) for seed in range(seeds)]
    return {"metric": spec.metric, "median": statistics.median(scores), "scores": scores}


def run_glue(model_dir: str, tasks: list[str], seeds: int = 5, lr: float | None = None, **kw) -> dict:
    """{task: finetune_median(...)} for GLUE tasks (names as in GLUE: rte, mrpc, cola, stsb, sst2);
    lr None: `default_lr` for the model's width."""
    lr = lr or default_lr(model_width(model_dir))
    out = {}
    for task in tasks:
        if task not in GLUE:
            raise ValueError(f"unknown GLUE task {task!r}; choose from {sorted(GLUE)}")
        train_ds, eval_ds = glue_splits(task)
        out[task] = finetune_median(model_dir, GLUE[task], train_ds, eval_ds, seeds, lr=lr, **kw)
    return out
