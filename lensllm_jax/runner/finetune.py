"""Fine-tune a candidate on nested subsets and record its test-loss curve (LENSLLM's data).

    cfg = finetune.FinetuneConfig()                                    # one recipe for all sizes
    curve = finetune.loss_curve(m.apply, m.params, pool, test, [200, 400, 800], cfg, seed=0)
    curve.losses      # (S,) test loss (nats per byte) after fine-tuning on each subset size
    curve.zero_shot   # test loss of the pretrained weights

Training minimises the token-weighted mean NLL of a batch over its target tokens,

    L(θ; batch) = −Σ_{b,t} m_{b,t} log p_θ(x_{b,t} | x_{b,<t}) / Σ_{b,t} m_{b,t}   (m = loss_mask),

with AdamW (or SGD) on global-norm-clipped gradients and a warmup + decay learning-rate schedule.
The jitted step compiles once per (params structure, batch shape) and is reused for every
subset size and every call (the learning rate is an argument, not a compiled constant).

Cost per step ≈ 6·P·B·T FLOPs (P parameters, batch B, length T); memory ≈ pretrained params
+ working params + 2 Adam moments (4·P floats; 3·P with SGD) + activations of one batch.
Pure JAX + optax; no I/O.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lensllm_jax.data.text import TokenData, nested_subset
from lensllm_jax.errors import LensLLMInputError
from lensllm_jax.models.losses import token_logprobs

__all__ = [
    "EvalResult",
    "FinetuneConfig",
    "FinetuneResult",
    "LossCurve",
    "check_config",
    "evaluate",
    "finetune",
    "learning_rates",
    "loss_curve",
    "make_train_step",
    "num_train_steps",
]

ApplyFn = Callable[..., jax.Array]
LOSS_UNITS = ("nats_per_byte", "nats_per_token")
_CHECK_EVERY = 16  # steps between host-side divergence checks (keeps dispatch asynchronous)


class FinetuneConfig(NamedTuple):
    """One fine-tuning recipe, used unchanged for every subset size and every candidate.

    Lin et al. (ICML 2024) fine-tune each model on every subset size with the same recipe, so a
    curve's shape reflects the data size, not a per-size tuning. The defaults are a standard
    full fine-tune of small/medium causal LMs on a few hundred to a few thousand examples:

      learning_rate 1e-4: peak AdamW step size (the usual 1e-5..3e-4 range of full fine-tunes).
      batch_size 8; epochs 3; min_steps 50: a tiny subset (e.g. 16 examples = 2 steps per
        epoch) still trains 50 steps (more epochs), so small sizes are not under-trained.
      max_steps 0: no cap (> 0 caps the steps of large subsets).
      optimizer "adamw" (β1 0.9, β2 0.999, ε 1e-8) or "sgd" (plain, no momentum).
      weight_decay 0.0: decoupled decay λ·θ added to the update (applied to every parameter).
      warmup_ratio 0.1 of the steps (or warmup_steps if given) of linear warmup
        lr·(s+1)/W, then decay "cosine" lr·½(1+cos πp), "linear" lr·(1−p), or "constant",
        p = (s−W)/(N−W).
      max_grad_norm 1.0: global-norm gradient clipping (<= 0 disables).
      eval_batch_size 16: examples per evaluation batch.
      divergence_factor 10.0: a training loss that is not finite or exceeds this multiple of
        max(first step's loss, 1 nat) marks the run "diverged" (it stops; no exception).
    """

    learning_rate: float = 1e-4
    batch_size: int = 8
    epochs: int = 3
    min_steps: int = 50
    max_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    decay: str = "cosine"
    max_grad_norm: float = 1.0
    eval_batch_size: int = 16
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    divergence_factor: float = 10.0


class EvalResult(NamedTuple):
    """Mean NLL over all target tokens: per token, and per UTF-8 byte of target text, with
    the standard errors of those ratios over the N examples (delta method, see `evaluate`)."""

    nats_per_token: float
    nats_per_byte: float
    num_tokens: int
    nats_per_token_se: float = float("nan")
    nats_per_byte_se: float = float("nan")


class FinetuneResult(NamedTuple):
    """Fine-tuned params, the loss of every step run, the number of steps run, and
    "ok" | "diverged"."""

    params: Any
    train_losses: np.ndarray
    num_steps: int
    status: str


class LossCurve(NamedTuple):
    """Test loss after fine-tuning on each nested subset size.

    sizes: (S,) int64 subset sizes; losses: (S,) float64 (NaN where status is "diverged");
    zero_shot: test loss of the pretrained params; num_steps: (S,) int64 optimizer steps run;
    status: (S,) "ok" | "diverged"; loss_unit: "nats_per_byte" | "nats_per_token";
    loss_se / zero_shot_se: standard errors of those test losses over the test examples.
    """

    sizes: np.ndarray
    losses: np.ndarray
    zero_shot: float
    num_steps: np.ndarray
    status: tuple[str, ...]
    loss_unit: str = "nats_per_byte"
    loss_se: np.ndarray | None = None  # (S,) standard error of each test loss (NaN diverged)
    zero_shot_se: float = float("nan")


# ---------------------------------------------------------------------------------------------
# Recipe


def check_config(config: FinetuneConfig) -> None:
    """Raise LensLLMInputError (one line) for a recipe that cannot run: unknown optimizer or
    decay, lr <= 0, batch sizes < 1, negative step counts, warmup_ratio outside [0, 1)."""

    def bad(what: str, hint: str) -> LensLLMInputError:
        return LensLLMInputError(f"fine-tuning config: {what}", hint=hint)

    if config.optimizer not in ("adamw", "sgd"):
        raise bad(f"unknown optimizer {config.optimizer!r}", "use 'adamw' or 'sgd'")
    if config.decay not in ("cosine", "linear", "constant"):
        raise bad(f"unknown decay {config.decay!r}", "use 'cosine', 'linear' or 'constant'")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        raise bad(f"learning_rate={config.learning_rate} is not > 0", "use e.g. 1e-4")
    for field in ("batch_size", "eval_batch_size"):
        if int(getattr(config, field)) < 1:
            raise bad(f"{field}={getattr(config, field)} is not >= 1", "use e.g. 8")
    if config.epochs < 0 or config.min_steps < 0 or config.max_steps < 0:
        raise bad("epochs, min_steps and max_steps must be >= 0", "use e.g. epochs=3")
    if not 0 <= config.warmup_ratio < 1:
        raise bad(f"warmup_ratio={config.warmup_ratio} is not in [0, 1)", "use e.g. 0.1")


def num_train_steps(num_examples: int, config: FinetuneConfig) -> int:
    """N = max(epochs·⌈n/B⌉, min_steps), capped at max_steps when max_steps > 0."""
    per_epoch = -(-int(num_examples) // int(config.batch_size))
    n = max(int(config.epochs) * per_epoch, int(config.min_steps), 1)
    return min(n, int(config.max_steps)) if config.max_steps > 0 else n


def learning_rates(config: FinetuneConfig, num_steps: int) -> np.ndarray:
    """(num_steps,) float64 learning rate of each step: linear warmup then decay (see config)."""
    n = int(num_steps)
    w = (
        int(config.warmup_steps)
        if config.warmup_steps is not None
        else math.ceil(config.warmup_ratio * n)
    )
    w = min(max(w, 0), n)
    s = np.arange(n, dtype=np.float64)
    p = np.clip((s - w) / max(n - w, 1), 0.0, 1.0)
    decay = {
        "cosine": 0.5 * (1.0 + np.cos(np.pi * p)),
        "linear": 1.0 - p,
        "constant": np.ones_like(p),
    }[config.decay]
    warm = (s + 1.0) / max(w, 1)
    return config.learning_rate * np.where(s < w, warm, decay)


def _transform_spec(config: FinetuneConfig) -> tuple:
    """The hashable part of the config that shapes the compiled update (not the lr)."""
    return (
        config.optimizer,
        float(config.adam_b1),
        float(config.adam_b2),
        float(config.adam_eps),
        float(config.weight_decay),
        float(config.max_grad_norm),
    )


def _transform(spec: tuple) -> optax.GradientTransformation:
    """Direction of the update, before scaling by −lr: clip → (Adam) → (+ λθ)."""
    optimizer, b1, b2, eps, wd, max_norm = spec
    parts = []
    if max_norm > 0:
        parts.append(optax.clip_by_global_norm(max_norm))
    if optimizer == "adamw":
        parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if wd > 0:
        parts.append(optax.add_decayed_weights(wd))
    return optax.chain(*parts) if parts else optax.identity()


# ---------------------------------------------------------------------------------------------
# Compiled kernels (module-level jit with static apply/spec: one compile per shape, reused)


def _batch_nll(apply: ApplyFn, params: Any, tokens, loss_mask, attention_mask):
    """(Σ NLL over target tokens, number of target tokens) of one batch, f32."""
    lp = token_logprobs(apply, params, tokens, attention_mask)
    m = loss_mask[:, 1:].astype(jnp.float32)
    return -(lp * m).sum(), m.sum()


def _mean_nll(apply: ApplyFn, params: Any, tokens, loss_mask, attention_mask):
    total, count = _batch_nll(apply, params, tokens, loss_mask, attention_mask)
    return total / jnp.maximum(count, 1.0)


def _step(apply, spec, params, opt_state, tokens, loss_mask, attention_mask, lr):
    loss, grads = jax.value_and_grad(_mean_nll, argnums=1)(
        apply, params, tokens, loss_mask, attention_mask
    )
    updates, opt_state = _transform(spec).update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
    return params, opt_state, loss


_train_step = jax.jit(_step, static_argnums=(0, 1), donate_argnums=(2, 3))


def _example_nll(apply: ApplyFn, params: Any, tokens, loss_mask, attention_mask):
    """(B,) Σ NLL over each example's target tokens, f32."""
    lp = token_logprobs(apply, params, tokens, attention_mask)
    return -(lp * loss_mask[:, 1:].astype(jnp.float32)).sum(axis=1)


_eval_sums = jax.jit(_example_nll, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _init_state(spec, params):
    """The optimizer state of `params`: one compiled program (eagerly, optax would compile one
    small program per leaf shape)."""
    return _transform(spec).init(params)


@functools.partial(jax.jit, static_argnums=0)
def _start(spec, params):
    """(a private copy of params, its optimizer state) in one compiled program: the step
    donates the copy's buffers, the caller keeps the pretrained ones."""
    return jax.tree.map(lambda x: x, params), _transform(spec).init(params)


# --- hooks for `lensllm_jax.parallel` (sharded programs): the pure functions it compiles with
# explicit shardings, and the `mesh=` switches below. Keep them when the kernels change.
# Cached so that one (apply, recipe) gives the same function objects: they key the sharded
# program caches.
@functools.lru_cache(maxsize=32)
def train_fns(
    apply: ApplyFn, config: FinetuneConfig
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(init_fn, step_fn), the pure, unjitted functions that `make_train_step` compiles:
    init_fn(params) -> opt_state; step_fn(params, opt_state, tokens, loss_mask,
    attention_mask, lr) -> (params, opt_state, loss)."""
    spec = _transform_spec(config)
    return _transform(spec).init, functools.partial(_step, apply, spec)


@functools.lru_cache(maxsize=32)
def example_nll_fn(apply: ApplyFn) -> Callable[..., Any]:
    """The pure per-example NLL sums that `evaluate` compiles:
    (params, tokens, loss_mask, attention_mask) -> (B,)."""
    return functools.partial(_example_nll, apply)


def make_train_step(apply: ApplyFn, config: FinetuneConfig, *, mesh: Any = None):
    """(init, step) of the recipe: `opt_state = init(params)`;
    `params, opt_state, loss = step(params, opt_state, batch, lr)` with batch a dict of (B, T)
    arrays (tokens, loss_mask, attention_mask) and lr a float. params/opt_state are donated.
    With a `mesh` (`lensllm_jax.parallel`), the step is its FSDP + data-parallel program.

    Cost of a step: ≈ 6·P·B·T FLOPs; compiled once per (params structure, B, T).
    """
    if mesh is not None:
        from lensllm_jax.parallel.programs import sharded_train_step

        init_fn, step_fn = train_fns(apply, config)
        return sharded_train_step(init_fn, step_fn, mesh)
    spec = _transform_spec(config)

    def init(params: Any) -> Any:
        return _init_state(spec, params)

    def step(params: Any, opt_state: Any, batch: dict, lr: float):
        # numpy conversions (no device program) and an f32 scalar: one compiled step
        return _train_step(
            apply,
            spec,
            params,
            opt_state,
            np.asarray(batch["tokens"], np.int32),
            np.asarray(batch["loss_mask"], np.int32),
            np.asarray(batch["attention_mask"], np.int32),
            np.float32(lr),
        )

    return init, step


def _padded_batch(data: TokenData, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `idx` of data; idx −1 gives a padding row with zero loss and attention masks."""
    real = idx >= 0
    b = data.batch(np.where(real, idx, 0))
    keep = real[:, None].astype(np.int32)
    return {
        "tokens": b["tokens"],
        "loss_mask": b["loss_mask"] * keep,
        "attention_mask": np.where(keep, b["attention_mask"], 1).astype(np.int32),
    }


# ---------------------------------------------------------------------------------------------
# Public API


def _ratio_se(num: np.ndarray, den: np.ndarray) -> float:
    """Standard error of R = Σ num / Σ den over n examples (delta method):
    sqrt(Σ (num_i − R den_i)² / (n (n − 1))) / mean(den); NaN for n < 2."""
    n = num.size
    if n < 2 or den.sum() <= 0:
        return float("nan")
    r = num.sum() / den.sum()
    return float(np.sqrt(np.sum((num - r * den) ** 2) / (n * (n - 1))) / den.mean())


def evaluate(
    apply: ApplyFn, params: Any, data: TokenData, *, batch_size: int = 16, mesh: Any = None
) -> EvalResult:
    """Mean NLL of `params` on all target tokens of `data`, and its standard error.

    nats_per_token = Σ_i Σ_t m_it·(−log p(x_it | x_i,<t)) / Σ m;  nats_per_byte = same sum /
    Σ_i target_bytes_i. The standard errors treat the N examples as a sample from the task:
    for R = Σ s_i / Σ d_i, se = sqrt(Σ (s_i − R d_i)² / (N (N − 1))) / mean(d) (delta method).
    Batches have a fixed shape (min(batch_size, N), T); the last one is padded with zero-mask
    rows. Per-example sums in f32 on device, accumulated in f64 on host. With a `mesh`, each
    batch runs as `lensllm_jax.parallel`'s sharded program.
    Cost: N/B forward passes, ≈ 2·P·N·T FLOPs.
    """
    n = data.num_examples
    if n == 0:
        raise LensLLMInputError("no examples to evaluate on", hint="pass a non-empty test set")
    bs = min(int(batch_size), n)
    order = np.arange(-(-n // bs) * bs)
    order[order >= n] = -1
    sums_fn = functools.partial(_eval_sums, apply)
    if mesh is not None:
        from lensllm_jax.parallel.programs import sharded_eval_sums

        sums_fn = sharded_eval_sums(example_nll_fn(apply), mesh)
    sums = []
    for idx in order.reshape(-1, bs):
        b = _padded_batch(data, idx)
        sums.append(sums_fn(params, b["tokens"], b["loss_mask"], b["attention_mask"]))
    nll = np.asarray(jax.device_get(sums), np.float64).reshape(-1)[:n]
    tokens = np.asarray(data.loss_mask, np.float64)[:, 1:].sum(axis=1)
    nbytes = np.asarray(data.target_bytes, np.float64)
    total, count = float(nll.sum()), round(float(tokens.sum()))
    per_token = total / count if count else float("nan")
    per_byte = total / nbytes.sum() if nbytes.sum() else float("nan")
    return EvalResult(per_token, per_byte, count, _ratio_se(nll, tokens), _ratio_se(nll, nbytes))


def _batch_order(n: int, batch_size: int, num_steps: int, seed: int) -> np.ndarray:
    """(num_steps, B) example indices: a fresh seeded permutation per epoch, the last batch of
    each epoch padded with −1 (zero-mask rows), epochs repeated until num_steps."""
    rng = np.random.default_rng(seed)
    per_epoch = -(-n // batch_size)
    epochs = -(-num_steps // per_epoch)
    rows = []
    for _ in range(epochs):
        perm = np.full(per_epoch * batch_size, -1, np.int64)
        perm[:n] = rng.permutation(n)
        rows.append(perm.reshape(per_epoch, batch_size))
    return np.concatenate(rows)[:num_steps]


def finetune(
    apply: ApplyFn,
    params: Any,
    train: TokenData,
    config: FinetuneConfig,
    *,
    seed: int,
    on_step: Callable[[int], None] | None = None,
    mesh: Any = None,
) -> FinetuneResult:
    """Fine-tune a copy of `params` on `train` with the recipe `config`.

    num_train_steps(n, config) steps on batches of fixed shape (B, T): each epoch visits every
    example once in a seeded random order, its last batch padded with zero-mask rows (so no
    example is dropped and the step compiles once). Step s: θ ← θ − lr_s·u_s, with u_s the
    clipped (Adam) direction of ∇L (module docstring) and lr_s from `learning_rates`.
    A non-finite loss, or one above divergence_factor × the first, stops the run with status
    "diverged" (checked every few steps; no exception). on_step(n), if given, is told of
    every n steps finished, at each of those checks (progress).

    Cost: N steps of ≈ 6·P·B·T FLOPs; memory ≈ 2·P (input + working params) + 2·P Adam
    moments + one batch's activations. Deterministic given `seed`. With a `mesh`, the steps
    run sharded (`make_train_step`) and those memory terms divide by the fsdp axis size.
    """
    check_config(config)
    n = train.num_examples
    if n == 0:
        raise LensLLMInputError("no examples to fine-tune on", hint="pass a non-empty subset")
    num_steps = num_train_steps(n, config)
    lrs = learning_rates(config, num_steps)
    order = _batch_order(n, int(config.batch_size), num_steps, seed)
    init, step = make_train_step(apply, config, mesh=mesh)
    # A private copy: the step donates its params buffers and the caller keeps the pretrained.
    if mesh is None:  # copy and optimizer state in one compiled program
        params, opt_state = _start(_transform_spec(config), params)
    else:  # the sharded init keeps the mesh's layout
        params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
        opt_state = init(params)

    losses: list[Any] = []
    checked = 0
    first = None
    status = "ok"
    for s in range(num_steps):
        params, opt_state, loss = step(params, opt_state, _padded_batch(train, order[s]), lrs[s])
        losses.append(loss)
        if len(losses) - checked >= _CHECK_EVERY or s == num_steps - 1:
            window = np.asarray(jax.device_get(losses[checked:]), np.float64)
            if on_step is not None:
                on_step(len(losses) - checked)
            checked = len(losses)
            first = window[0] if first is None else first
            limit = config.divergence_factor * max(first, 1.0)
            if not np.all(np.isfinite(window)) or np.any(window > limit):
                status = "diverged"
                break
    train_losses = np.asarray(jax.device_get(losses), np.float32)
    return FinetuneResult(params, train_losses, len(losses), status)


def _check_sizes(sizes: Sequence[int] | np.ndarray, pool_size: int) -> np.ndarray:
    arr = np.asarray(sizes, dtype=np.float64).ravel()
    if arr.size == 0:
        raise LensLLMInputError("no subset sizes given", hint="pass e.g. sizes 200,400,800")
    bad = ~np.isfinite(arr) | (arr < 1) | (arr != np.round(arr))
    if bad.any():
        raise LensLLMInputError(
            f"subset size {arr[bad][0]:g} is not a positive integer",
            hint="pass sizes like 200,400,800",
        )
    if np.any(np.diff(arr) <= 0):
        raise LensLLMInputError(
            f"subset sizes {', '.join(f'{s:g}' for s in arr)} are not strictly increasing",
            hint="list each size once, smallest first",
        )
    if arr[-1] > pool_size:
        raise LensLLMInputError(
            f"subset size {arr[-1]:g} exceeds the fine-tuning pool of {pool_size} examples",
            hint="use smaller sizes or provide more examples",
        )
    return arr.astype(np.int64)


def loss_curve(
    apply: ApplyFn,
    params: Any,
    pool: TokenData,
    test: TokenData,
    sizes: Sequence[int] | np.ndarray,
    config: FinetuneConfig,
    *,
    seed: int,
    loss_unit: str = "nats_per_byte",
    on_point: Callable[[int, float, str, int], None] | None = None,
    on_params: Callable[[int, Any], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    mesh: Any = None,
) -> LossCurve:
    """Test loss of `params` fine-tuned on nested subsets of `pool` of each size.

    zero_shot = evaluate(params, test); for each size D: fine-tune from the pretrained `params`
    (never from the previous size) on nested_subset(range(len(pool)), D, seed) with `config`
    and `seed`, then evaluate on `test` in `loss_unit`. A diverged run gives NaN and status
    "diverged". The train step and evaluation compile once for the whole curve.
    Each point depends only on (params, pool, test, size, config, seed), not on the other
    sizes: a curve can be computed (or resumed) one size at a time with identical results.
    on_point(size, loss, status, num_steps), if given, is called after each size (progress);
    on_params(size, fine_tuned_params), if given, after each size that did not diverge (to
    measure the fine-tuned model, e.g. its Hessian, before its buffers are freed);
    on_step(n) as in `finetune`.
    mesh: a `jax.sharding.Mesh` (`lensllm_jax.parallel.make_mesh`) to run every step and
    evaluation sharded on (params placed by `parallel.shard_params`); None: one device.

    Raises LensLLMInputError for sizes that are not positive integers, not strictly increasing
    or larger than the pool, and for an unknown loss_unit.
    Cost: Σ_D num_train_steps(D) steps of ≈ 6·P·B·T FLOPs + (S+1) evaluations of the test set.
    """
    if loss_unit not in LOSS_UNITS:
        raise LensLLMInputError(
            f"unknown loss unit {loss_unit!r}", hint=f"use one of {', '.join(LOSS_UNITS)}"
        )
    check_config(config)
    sizes_arr = _check_sizes(sizes, pool.num_examples)
    ebs = int(config.eval_batch_size)
    zero = evaluate(apply, params, test, batch_size=ebs, mesh=mesh)
    index = np.arange(pool.num_examples)
    losses, ses, steps, status = [], [], [], []
    for size in sizes_arr:
        sub = nested_subset(index, int(size), seed=seed)
        res = finetune(apply, params, pool.take(sub), config, seed=seed, on_step=on_step, mesh=mesh)
        loss = se = float("nan")
        if res.status == "ok":
            ev = evaluate(apply, res.params, test, batch_size=ebs, mesh=mesh)
            loss, se = getattr(ev, loss_unit), getattr(ev, f"{loss_unit}_se")
        ok = res.status == "ok" and math.isfinite(loss)
        losses.append(loss if ok else float("nan"))
        ses.append(se if ok else float("nan"))
        steps.append(res.num_steps)
        status.append("ok" if ok else "diverged")
        if on_point is not None:
            on_point(int(size), losses[-1], status[-1], int(res.num_steps))
        if on_params is not None and ok:
            on_params(int(size), res.params)
        del res  # free the fine-tuned params before the next size
    return LossCurve(
        sizes_arr,
        np.asarray(losses, np.float64),
        float(getattr(zero, loss_unit)),
        np.asarray(steps, np.int64),
        tuple(status),
        loss_unit,
        np.asarray(ses, np.float64),
        float(getattr(zero, f"{loss_unit}_se")),
    )
