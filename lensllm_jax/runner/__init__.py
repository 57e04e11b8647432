"""The `lensllm run` job (`job.run`, also `lensllm_jax.run`): fine-tune your candidates on
small nested subsets of your task, measure their NTK (and Hessian), and rank them for the
full fine-tune. (Named `runner`, not `run`, so that `lensllm_jax.run` is the function.)

Rooms: `checks` (every input, before any work), `finetune` (the recipe and the loss
curve), `measure` (one candidate's curve, NTK and Hessian), `store` (manifest, resume,
one .npz per candidate), `report` (report.json), `job` (the run itself).
"""

from lensllm_jax.runner.finetune import FinetuneConfig
from lensllm_jax.runner.job import run
from lensllm_jax.runner.result import CandidateResult, RunResult

__all__ = ["CandidateResult", "FinetuneConfig", "RunResult", "run"]
