"""Calibrate the static report on a GPU: measured against modelled time per kernel (CUDA only).

For each traced configuration the same training forward + backward runs for real (bf16, random
tokens, 15% labelled) under torch.profiler; each Triton kernel's mean device time is matched by name
with the mean modelled time of its launches (kernel_tools.perf_report), and every row goes to
<out>/sm90_calibration.csv: device, versions, commit, config, kernel, launches, measured_us,
modelled_us, ratio. A ratio far from 1 says which term of kernel_tools/cost_model.py to revisit.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import torch
import triton

from roberta_ds.config import model_preset
from roberta_ds.data.masking import masked_positions, max_masked
from roberta_ds.model import RobertaMLM

COLUMNS = [
    "device",
    "torch",
    "triton",
    "commit",
    "config",
    "kernel",
    "launches",
    "measured_us",
    "modelled_us",
    "ratio",
]


def _measure(cfg) -> dict[str, list[float]]:
    mcfg = model_preset(
        cfg.preset, kernels="triton", hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout
    )
    model = RobertaMLM(mcfg).to("cuda", torch.bfloat16).train()
    B, S = cfg.micro_batch, cfg.seq_len
    ids = torch.randint(4, mcfg.vocab_size, (B, S), device="cuda")
    chosen = torch.rand(B, S, device="cuda").argsort(dim=1)[:, : int(0.15 * S)]  # 15% of each row
    labels = torch.full_like(ids, -100).scatter(1, chosen, ids.gather(1, chosen))
    segments = (torch.arange(S, device="cuda") // 128).expand(B, S) if cfg.document_mask else None
    mask = torch.ones(B, S, dtype=torch.long, device="cuda")
    positions = masked_positions(labels, max_masked(S, 0.15))  # as the collator hands them over

    def step():
        out = model(ids, attention_mask=mask, labels=labels, segment_ids=segments, mlm_positions=positions)
        out.loss.backward()

    for _ in range(2):  # compile and warm up
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    times = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name].append(ev.device_time / 1.0)  # us
    return times


def calibrate(modelled_steps: list[tuple], out: Path, commit: str) -> None:
    """`modelled_steps`: (step config, [(kernel, category, modelled seconds) per launch]) as
    perf_report.analyse gives them; each step then runs for real and is compared kernel by kernel."""
    if not torch.cuda.is_available():
        raise SystemExit("perf_report --calibrate needs a CUDA device")
    rows = []
    for cfg, per_launch in modelled_steps:
        modelled = defaultdict(list)
        for name, category, seconds in per_launch:
            if category == "triton":
                modelled[name].append(seconds * 1e6)
        measured = _measure(cfg)
        for name, m in sorted(modelled.items()):
            got = measured.get(name, [])
            mean_meas = sum(got) / len(got) if got else float("nan")
            mean_model = sum(m) / len(m)
            rows.append(
                dict(
                    device=torch.cuda.get_device_name(),
                    torch=torch.__version__,
                    triton=triton.__version__,
                    commit=commit,
                    config=cfg.label,
                    kernel=name,
                    launches=len(got),
                    measured_us=round(mean_meas, 2),
                    modelled_us=round(mean_model, 2),
                    ratio=round(mean_meas / mean_model, 3),
                )  # fmt: skip
            )
            print(f"  {cfg.label:<20} {name:<24} measured {mean_meas:9.2f} us  modelled {mean_model:9.2f} us")
    path = out / "sm90_calibration.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)
