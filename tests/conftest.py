import os
import platform


# The CPU interpreter's tl.dot is numpy's matmul (OpenBLAS). The attention kernels' fp32 IEEE
# cancellation rests on a dot summing the inner dimension in one order whatever the tile's shape or
# orientation, as a GPU's fp32 dot does. OpenBLAS's FMA kernels, picked on AVX2 hosts (Haswell, Zen),
# do not: a@b.T and (b@a.T).T differ by up to 7.6e-6 at 64 x 64; its AVX kernel (Sandybridge) does,
# as its AVX-512 one does. Read when numpy loads, and torch imports numpy, so it goes first. Only
# where the CPU has AVX: a kernel the CPU cannot run is an illegal instruction, not a fallback.
def _has_avx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return platform.machine() in ("x86_64", "AMD64") and " avx " in f.read()
    except OSError:
        return False


if _has_avx():
    os.environ.setdefault("OPENBLAS_CORETYPE", "Sandybridge")

import torch  # noqa: E402

# Triton kernels run in the CPU interpreter when no GPU is present. This must be set before any
# module defining @triton.jit functions is imported, so it lives at the very top of conftest.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No Weights & Biases run for every train.py the tests start (inherited by their subprocesses):
# tests/training/test_loggers.py turns it on where W&B itself is under test.
os.environ.setdefault("WANDB_MODE", "disabled")

import json  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def kjv_dataset(tmp_path_factory):
    """A small real-text dataset: 150 chapters of the King James Bible, BPE 512, blocks of 64."""
    from roberta_ds.data.corpus import kjv_documents
    from roberta_ds.data.prepare import prepare

    d = tmp_path_factory.mktemp("kjv")
    with (d / "kjv.jsonl").open("w") as f:
        for _, doc in zip(range(150), kjv_documents()):
            f.write(json.dumps({"text": doc}) + "\n")
    return prepare(
        [str(d / "kjv.jsonl")],
        d / "ds",
        vocab_size=512,
        seq_len=64,
        valid_every=15,
        num_proc=1,
        progress=False,
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
