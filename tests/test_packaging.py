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
