"""The offline quality gate: every probe on a model and on a random-init model of the same config,
as one JSON-able dict and printed tables (see roberta_ds/evaluate.py for the command line)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from roberta_ds.evaluation import corpus_tasks, probes
from roberta_ds.evaluation.finetune import CORPUS_SOURCE, corpus_splits, default_lr, finetune_median


def run(
    path: str | Path,
    n_cloze: int = 300,
    finetune_seeds: int = 1,
    finetune_epochs: int = 3,
    finetune_lr: float | None = None,
    log=print,
) -> dict:
    """Held-out MLM (run folders only), cloze, linear probe and short fine-tune on the corpus source
    task, each for `trained` and `random` (same config, fresh init). finetune_lr None: by model
    width (finetune.default_lr)."""
    t0 = time.perf_counter()
    loaded = probes.load(path)
    # The built-in corpus's held-out documents, as the run's dataset chose them (its settings).
    corpus = corpus_tasks.split_sentences(loaded.split_settings)
    tok = loaded.tokenizer
    items = corpus_tasks.cloze_items(tok, corpus, n_cloze)
    task = corpus_tasks.source_task(corpus)
    train_ds, test_ds = corpus_splits(task)
    y_train = torch.tensor([y for _, y in task["train"]])
    y_test = torch.tensor([y for _, y in task["test"]])
    finetune_lr = finetune_lr or default_lr(loaded.model.cfg.hidden_size)
    res: dict = {
        "model": str(path),
        "finetune_lr": finetune_lr,
        "cloze_items": len(items),
        "source_task": {k: len(v) for k, v in task.items()},
    }
    models = {"random": probes.random_init_like(loaded.model), "trained": loaded.model}
    for name, model in models.items():
        log(f"evaluate: {name} ...")
        r = res[name] = {}
        if loaded.valid is not None:
            r["heldout_mlm"] = probes.heldout_mlm(model, loaded.valid)
        r["cloze"] = probes.cloze(model, tok, items)
        x_train = probes.features(model, tok, [t for t, _ in task["train"]])
        x_test = probes.features(model, tok, [t for t, _ in task["test"]])
        r["linear_probe_accuracy"] = probes.linear_probe(x_train, y_train, x_test, y_test)
        if finetune_seeds:
            from roberta_ds.model import save_hf

            with tempfile.TemporaryDirectory() as hf_dir:
                save_hf(model, hf_dir, tokenizer=tok)
                r["finetune"] = finetune_median(
                    hf_dir,
                    CORPUS_SOURCE,
                    train_ds,
                    test_ds,
                    finetune_seeds,
                    epochs=finetune_epochs,
                    lr=finetune_lr,
                )
    res["examples"] = examples(items, res)
    res["seconds"] = time.perf_counter() - t0
    return res


def examples(items: list[dict], res: dict, per_source: int = 4) -> list[dict]:
    """A few cloze items per source with random-init ('before') and trained ('after') top-3
    predictions: the first per_source // 2 the trained model gets right at top-1 (if any), then the
    first it gets wrong, in item order. Not a sample of the rates (the probe table has those): it
    shows what right and wrong answers look like."""
    right = {}
    for i, it in enumerate(items):
        right.setdefault(it["source"], {True: [], False: []})
        right[it["source"]][res["trained"]["cloze"]["predictions_ids"][i][0] == it["answer_id"]].append(i)
    out = []
    for hits in right.values():
        picked = hits[True][: per_source // 2]
        picked += hits[False][: per_source - len(picked)]
        for i in sorted(picked):
            out.append(
                {
                    "text": items[i]["text"],
                    "answer": items[i]["answer"],
                    "right": i in hits[True],
                    "before": res["random"]["cloze"]["predictions"][i][:3],
                    "after": res["trained"]["cloze"]["predictions"][i][:3],
                }
            )
    return out


def summary_rows(res: dict) -> list[tuple[str, str, str]]:
    """(metric, random init, trained) rows for the printed table."""

    def pct(x):
        return f"{100 * x:.1f}%"

    rows = []
    if "heldout_mlm" in res["trained"]:
        for key, fmt in (("loss", "{:.3f}".format), ("accuracy", pct)):
            rows.append(
                (f"held-out MLM {key}", *(fmt(res[m]["heldout_mlm"][key]) for m in ("random", "trained")))
            )
    for suffix, what in (
        ("", f"all {res['cloze_items']} words"),
        ("_bible", "Bible"),
        ("_python", "Python docs"),
    ):
        rows.append(
            (
                f"cloze top-1 / top-5, {what}",
                *(
                    f"{pct(res[m]['cloze']['top1' + suffix])} / {pct(res[m]['cloze']['top5' + suffix])}"
                    for m in ("random", "trained")
                ),
            )
        )
    rows.append(
        (
            "source probe: linear (3 classes)",
            *(pct(res[m]["linear_probe_accuracy"]) for m in ("random", "trained")),
        )
    )
    if "finetune" in res["trained"]:
        n = len(res["trained"]["finetune"]["scores"])
        rows.append(
            (
                f"source probe: fine-tune (median of {n})",
                *(pct(res[m]["finetune"]["median"]) for m in ("random", "trained")),
            )
        )
    return rows


def _table(header: tuple, rows: list[tuple]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def format_report(res: dict, max_text: int = 60) -> str:
    def short(s):
        return (
            s
            if len(s) <= max_text
            else "…" + s[-(max_text - 1) :]
            if "<mask>" in s[-max_text:]
            else s[: max_text - 1] + "…"
        )

    fill = [
        (
            short(e["text"]),
            repr(e["answer"]),
            " ".join(repr(p) for p in e["before"]),
            " ".join(repr(p) for p in e["after"]),
            "yes" if e["right"] else "no",
        )
        for e in res["examples"]
    ]
    header = (
        "fill-mask on held-out text",
        "answer",
        "before (random init)",
        "after (trained)",
        "top-1 right",
    )
    return _table(header, fill) + "\n\n" + _table(("probe", "random init", "trained"), summary_rows(res))
