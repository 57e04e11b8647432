"""The numerical core: pure JAX functions, no files, no environment variables.

`laws` (the scaling laws and their Jacobians), `fit` (batched Levenberg-Marquardt over
candidates x starts, float64, a status per candidate), `ntk` (empirical NTK, NTK-vector
products, F(Θ, t)) and `hessian` (HVPs, Hutchinson / Hutch++ traces, the top eigenvalue,
vᵀHv). Import the submodule you need: importing this package loads none of them.
"""
