import subprocess
import sys


def test_transformers_does_not_mistake_our_kernels_package_for_hf_kernels():
    # PyPI's `kernels` (Hugging Face hub kernels) shares our import name; transformers probes it.
    code = "import transformers.utils as u; import kernels; print(u.is_kernels_available(), kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    available, path = out.split()
    assert available == "False"
    assert path.endswith("kernels/__init__.py")


def test_public_api():
    import kernels
    import roberta_ds

    for name in ("load_hf", "save_hf", "RobertaMLM", "model_preset"):
        assert hasattr(roberta_ds, name)
    for name in ("attention_ref", "layer_norm_ref", "bias_gelu_ref", "cross_entropy_ref"):
        assert hasattr(kernels, name)


def test_every_top_level_package_is_packaged():
    # a package missing from [tool.setuptools.packages.find] imports from a checkout but not once installed
    from pathlib import Path

    from setuptools import find_packages
    from setuptools.config.pyprojecttoml import read_configuration

    root = Path(__file__).resolve().parents[1]
    find = read_configuration(root / "pyproject.toml", expand=False)["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(root, include=find["include"]))
    packages = {p.parent.name for p in root.glob("*/__init__.py")} - {"tests"}
    assert {"kernels", "kernel_tools", "roberta_ds"} <= packages <= found
