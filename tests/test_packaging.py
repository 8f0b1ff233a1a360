import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_imports_with_hf_kernels_beside_our_ops():
    # Our ops were once the top-level package `kernels`, the import name of Hugging Face's hub
    # kernels, which transformers 5.25 requires and imports: from a checkout, ours shadowed it and
    # transformers' RoBERTa failed to import. The ops are `roberta_kernels` now.
    code = (
        "import transformers.models.roberta.modeling_roberta, roberta_kernels; "
        "print(roberta_kernels.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("roberta_kernels/__init__.py")
    assert not (ROOT / "kernels").exists()  # nothing in a checkout may be named like PyPI's `kernels`


def test_public_api():
    import roberta_ds
    import roberta_kernels

    for name in ("load_hf", "save_hf", "RobertaMLM", "model_preset"):
        assert hasattr(roberta_ds, name)
    for name in ("attention_ref", "layer_norm_ref", "bias_gelu_ref", "cross_entropy_ref"):
        assert hasattr(roberta_kernels, name)


def test_every_top_level_package_is_packaged():
    # a package missing from [tool.setuptools.packages.find] imports from a checkout but not once installed
    from pathlib import Path

    from setuptools import find_packages
    from setuptools.config.pyprojecttoml import read_configuration

    root = Path(__file__).resolve().parents[1]
    find = read_configuration(root / "pyproject.toml", expand=False)["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(root, include=find["include"]))
    packages = {p.parent.name for p in root.glob("*/__init__.py")} - {"tests"}
    assert {"roberta_kernels", "kernel_tools", "roberta_ds"} <= packages <= found
