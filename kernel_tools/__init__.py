"""Tooling around the ops in `roberta_kernels/`, kept apart from them: it may import `roberta_kernels` and
`roberta_ds`, and neither imports it (roberta_kernels <- roberta_ds <- kernel_tools).

- bench: each fused kernel against torch eager, torch.compile and the SDPA backends (GPU; --smoke on CPU)
- compile_check: every kernel compiled for sm_90 at its launch configurations, without a GPU
- the static sm_90 report: trace (the model's launches on meta tensors), sass (what each binary
  holds), cost_model (a roofline per launch), perf_report (the report and its --check),
  perf_calibrate (measured against modelled per kernel, CUDA only)

Each command-line tool runs as `python -m kernel_tools.<name>`. The sm_90 facts they check and
model against live in roberta_kernels/sm90.py.
"""
