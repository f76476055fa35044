"""Training steps: next-token cross-entropy and distillation from a frozen teacher.

An *objective* maps ``(params, micro_batch, frozen)`` to the SUM of its per-position loss over
the counted positions (``labels != -100``) and a dict of named per-position sums to report
(``frozen`` is whatever the objective reads but does not train: the teacher's params for KD).
The step divides by the number of counted positions in the whole optimizer batch, so::

    loss = Σ_micro-batches Σ_counted-positions ℓ  /  #counted positions

is the mean over the batch whatever ``grad_accum`` is, and its gradient is accumulated over the
micro-batches with ``lax.scan`` (one compiled micro-step, activations of one micro-batch alive at
a time). A batch is a dict of ``[grad_accum, micro_batch, T]`` arrays: ``input_ids``, ``labels``
(the token predicted at each position, or -100) and optionally ``attention_mask``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import losses
from .model import JaxModelConfig, Params, forward

__all__ = [
    "Objective",
    "TrainState",
    "cached_kd_objective",
    "ce_objective",
    "init_train_state",
    "kd_objective",
    "make_eval_step",
    "make_train_step",
    "split_micro_batches",
]

Batch = Mapping[str, jax.Array]
Objective = Callable[[Params, Batch, Any], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
    """Everything a train step updates. ``step`` counts the optimizer steps taken."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def split_micro_batches(batch: Mapping[str, np.ndarray], grad_accum: int) -> dict[str, Any]:
    """``[B, ...]`` arrays → ``[grad_accum, B / grad_accum, ...]``; micro-batch ``i`` holds
    samples ``[i·m, (i+1)·m)`` (``m = B / grad_accum``), in the torch backend's order."""
    out = {}
    for name, array in batch.items():
        rows = array.shape[0]
        if rows % grad_accum:
            raise ValueError(f"batch of {rows} rows does not split into {grad_accum} micro-batches")
        out[name] = array.reshape(grad_accum, rows // grad_accum, *array.shape[1:])
    return out


def _counted(micro_batch: Batch) -> jax.Array:
    return micro_batch["labels"] != losses.IGNORE_INDEX


def _masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, values, 0.0))


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------


def ce_objective(
    config: JaxModelConfig, *, compute_dtype: Any = None, remat: bool = False
) -> Objective:
    """Next-token cross-entropy ``−log q(y_t)`` summed over the counted positions."""

    def objective(params: Params, mb: Batch, frozen: Any) -> tuple[jax.Array, dict]:
        del frozen
        logits = forward(params, config, mb["input_ids"], mb.get("attention_mask"),
                         compute_dtype=compute_dtype, remat=remat)
        ce = _masked_sum(losses.cross_entropy_terms(logits, mb["labels"]), _counted(mb))
        return ce, {"ce": ce}

    return objective


def kd_objective(
    student_config: JaxModelConfig,
    teacher_config: JaxModelConfig,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
    soft_scale: float = 1.0,
    compute_dtype: Any = None,
    remat: bool = False,
) -> Objective:
    """Distillation from a frozen teacher (its params are the step's ``frozen`` argument)::

        ℓ_t = (1 − w)·s·D_T(teacher_t, student_t) + w·CE(student_t, y_t)

    summed over the counted positions, with ``D`` the named divergence at temperature ``T``
    (:func:`kdspec_jax.losses.divergence_terms`), ``w = hard_label_weight``, ``s = soft_scale``
    (pass ``T²`` for Hinton's scaling) and ``CE`` at temperature 1: the torch backend's
    ``kd_loss``. The teacher gets no gradient.
    """
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ValueError(
            f"student vocabulary ({student_config.vocab_size}) and teacher vocabulary "
            f"({teacher_config.vocab_size}) must match for logit distillation"
        )
    if divergence not in losses.DIVERGENCES:
        raise ValueError(
            f"unknown divergence {divergence!r}; expected one of {', '.join(losses.DIVERGENCES)}"
        )
    if not 0.0 <= hard_label_weight <= 1.0:
        raise ValueError(f"hard_label_weight must be in [0, 1], got {hard_label_weight}")

    def objective(params: Params, mb: Batch, teacher_params: Params) -> tuple[jax.Array, dict]:
        mask = mb.get("attention_mask")
        student = forward(params, student_config, mb["input_ids"], mask,
                          compute_dtype=compute_dtype, remat=remat)
        teacher = forward(teacher_params, teacher_config, mb["input_ids"], mask,
                          compute_dtype=compute_dtype)
        teacher = jax.lax.stop_gradient(teacher)
        counted = _counted(mb)
        soft = _masked_sum(
            losses.divergence_terms(divergence, student, teacher, beta=beta,
                                    temperature=temperature),
            counted,
        )
        ce = _masked_sum(losses.cross_entropy_terms(student, mb["labels"]), counted)
        return _mix(soft, ce, hard_label_weight, soft_scale), {"kd": soft, "ce": ce}

    return objective


def _mix(soft: jax.Array, ce: jax.Array, hard_label_weight: float,
         soft_scale: float) -> jax.Array:
    """``(1 − w)·s·soft + w·ce`` (the CE term left out at ``w = 0``, so its graph is too)."""
    total = (1.0 - hard_label_weight) * soft_scale * soft
    if hard_label_weight > 0:
        total = total + hard_label_weight * ce
    return total


def cached_kd_objective(
    student_config: JaxModelConfig,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
    soft_scale: float = 1.0,
    compute_dtype: Any = None,
    remat: bool = False,
) -> Objective:
    """Distillation from a cached teacher slice, read from the micro-batch (``teacher_ids``,
    ``teacher_probs``: ``[b, T, K]``, probabilities summing to 1)::

        ℓ_t = (1 − w)·s·Σ_k p_k (log p_k − log q_{id_k}) + w·CE(student_t, y_t)

    summed over the counted positions, ``q = softmax(student / T)`` over the full vocabulary
    (:func:`kdspec_jax.losses.sparse_forward_kl_terms`). Only the forward KL has a slice form;
    the torch backend's cached ``Distill``. ``vocab_size`` is the cache's (the teacher's)."""
    if student_config.vocab_size != vocab_size:
        raise ValueError(
            f"teacher vocabulary ({vocab_size}) != student vocabulary "
            f"({student_config.vocab_size}): token-level KD needs one shared tokenizer")
    if not 0.0 <= hard_label_weight <= 1.0:
        raise ValueError(f"hard_label_weight must be in [0, 1], got {hard_label_weight}")

    def objective(params: Params, mb: Batch, frozen: Any) -> tuple[jax.Array, dict]:
        del frozen
        student = forward(params, student_config, mb["input_ids"], mb.get("attention_mask"),
                          compute_dtype=compute_dtype, remat=remat)
        counted = _counted(mb)
        soft = _masked_sum(
            losses.sparse_forward_kl_terms(student, mb["teacher_ids"], mb["teacher_probs"],
                                           temperature=temperature),
            counted,
        )
        ce = _masked_sum(losses.cross_entropy_terms(student, mb["labels"]), counted)
        return _mix(soft, ce, hard_label_weight, soft_scale), {"kd": soft, "ce": ce}

    return objective


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _accumulate(
    objective: Objective, params: Params, batch: Batch, frozen: Any, count: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array], Params]:
    """Loss, reported means and gradient of ``Σ_micro objective / count`` over ``batch``'s
    leading micro-batch axis."""

    def scaled(p: Params, mb: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        total, parts = objective(p, mb, frozen)
        return total / count, {k: v / count for k, v in parts.items()}

    grad_fn = jax.value_and_grad(scaled, has_aux=True)

    def micro_step(carry: tuple, mb: Batch) -> tuple[tuple, None]:
        loss, parts, grads = carry
        (mb_loss, mb_parts), mb_grads = grad_fn(params, mb)
        parts = {k: parts[k] + mb_parts[k] for k in parts}
        grads = jax.tree_util.tree_map(jnp.add, grads, mb_grads)
        return (loss + mb_loss, parts, grads), None

    first = jax.tree_util.tree_map(lambda a: a[0], batch)
    part_names = jax.eval_shape(lambda: scaled(params, first))[1]
    zeros = (
        jnp.zeros((), jnp.float32),
        {k: jnp.zeros((), jnp.float32) for k in part_names},
        jax.tree_util.tree_map(jnp.zeros_like, params),
    )
    (loss, parts, grads), _ = jax.lax.scan(micro_step, zeros, batch)
    return loss, parts, grads


def make_train_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    *,
    lr_fn: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """A pure ``step(state, batch, frozen) -> (state, metrics)``; jit it (or use
    :func:`kdspec_jax.sharding.jit_train_step`). Metrics: ``loss`` (mean over the counted
    positions), the objective's parts as means, ``grad_norm`` (before clipping),
    ``n_targets`` and, given ``lr_fn``, the ``lr`` this step used."""

    def step(
        state: TrainState, batch: Batch, frozen: Any = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        n_targets = jnp.sum(batch["labels"] != losses.IGNORE_INDEX)
        count = jnp.maximum(n_targets, 1).astype(jnp.float32)
        loss, parts, grads = _accumulate(objective, state.params, batch, frozen, count)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
                   "n_targets": n_targets}
        if lr_fn is not None:
            metrics["lr"] = lr_fn(state.step)
        return TrainState(params, opt_state, state.step + 1), metrics

    return step


def make_eval_step(
    objective: Objective,
) -> Callable[[Params, Batch, Any], dict[str, jax.Array]]:
    """``eval(params, batch, frozen) -> {"loss_sum", parts' sums, "n_targets"}`` over a batch
    of ``[micro_batches, b, T]`` arrays; sum these over an eval set and divide once (for the
    CE objective, ``exp(loss_sum / n_targets)`` is the perplexity)."""

    def evaluate(params: Params, batch: Batch, frozen: Any = None) -> dict[str, jax.Array]:
        def micro(carry: dict, mb: Batch) -> tuple[dict, None]:
            total, parts = objective(params, mb, frozen)
            new = {"loss_sum": total, **{f"{k}_sum": v for k, v in parts.items()}}
            return {k: carry[k] + new[k] for k in carry}, None

        first = jax.tree_util.tree_map(lambda a: a[0], batch)
        names = ["loss_sum", *(f"{k}_sum" for k in jax.eval_shape(
            lambda: objective(params, first, frozen))[1])]
        sums, _ = jax.lax.scan(micro, {k: jnp.zeros((), jnp.float32) for k in names}, batch)
        return {**sums, "n_targets": jnp.sum(batch["labels"] != losses.IGNORE_INDEX)}

    return evaluate
