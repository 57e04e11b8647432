"""lensllm-jax: choose the pretrained LLM to fine-tune, and say how sure the choice is.

LENSLLM (Zeng et al., ICML 2025) on top of the rectified scaling law and AtS of
Lin et al. (ICML 2024), in JAX. Data flows one way:
files -> curves/kernels -> fits -> ranking -> report.

The numerical core (`laws`, `fit`, `ntk`, `hessian`) is pure JAX and does no I/O.
"""

__version__ = "0.1.0"
