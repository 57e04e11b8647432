"""The fine-tuning scaling benchmark of Lin et al. (ICML 2024) as a yardstick: its protocol
(`protocol.run`: every method, every budget, every metric), its data (`download`: FLAN and
Gigaword shipped, WMT19 fetched and checked), its metrics, the calibration of "how sure"
(`calibration`) and the research knobs behind the shipped choices (`ablations`).
"""

from lensllm_jax.benchmark.download import resolve_data
from lensllm_jax.benchmark.protocol import BUDGET_RATIOS, TARGET, Row, run

__all__ = ["BUDGET_RATIOS", "TARGET", "Row", "resolve_data", "run"]
