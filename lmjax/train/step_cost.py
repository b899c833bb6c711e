"""What one train step costs: FLOPs counted by XLA and by hand, and the machine's FLOP/s limit.

Logged once at the start of a run (`perf/flops_per_step`, `perf/flops_per_token`,
`perf/flops_per_step_analytic`) and used for `perf/mfu` in every logging window.

Where the count comes from (`perf/flops_source` in the run's printout):
- `compiled`: on one device, with unrolled layers and no gradient accumulation (the facts
  default), the very program that trains is compiled up front (jax keeps it for the first step,
  so nothing compiles twice) and its `cost_analysis()` is the count.
- `lowered-unrolled`: otherwise the count comes from a copy of the step with unrolled layers
  and the whole batch in one micro-batch (the same arithmetic: XLA's analysis counts a loop
  body once, see lmjax.monitor.flops), unpartitioned (global FLOPs, not one device's share),
  read from the lowered HLO before optimisation, which skips a second compilation; on the
  shapes in tests/test_flops.py it is within 2% of the compiled count.
Tokens per step count every position of every row, padding included: the program runs them all.
"""
import functools

import jax
import jax.numpy as jnp

from lmjax.monitor import flops as flops_lib
from lmjax.monitor.hardware import measure_matmul_flops, peak_flops_for_device
from lmjax.train.state import init_state_fn
from lmjax.train.step import make_train_step


def train_step_flops(train_step, state, batch, model, tx, schedule, layout, *, grad_accum, seq_len, probes,
                     max_segment_len=0) -> tuple[float, str]:
    """(FLOPs of one optimizer step, source). Compiles the real step when that gives the count.
    `max_segment_len`: the promise the training step passes the model (block skipping)."""
    has_loops = bool(getattr(model.cfg, "scan_layers", False)) or grad_accum > 1
    if layout.mesh.size == 1 and not has_loops:
        with layout.context():
            compiled = train_step.jitted.lower(state, batch).compile()
        return flops_lib.compiled_flops(compiled), "compiled"
    unrolled = flops_lib.unrolled_copy(model)
    abstract_state = jax.eval_shape(init_state_fn(unrolled, tx, seq_len), jax.random.PRNGKey(0))
    abstract_batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    apply_fn = functools.partial(unrolled.apply, max_segment_len=max_segment_len)
    counting_step = make_train_step(apply_fn, tx, schedule, 1, probes=probes)
    analysis = counting_step.lower(abstract_state, abstract_batch).cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis["flops"]), "lowered-unrolled"


def flops_limit(compute_dtype: str) -> tuple[float | None, str]:
    """FLOP/s the whole job could reach: vendor peak x devices on accelerators, a measured f32
    matmul on CPU (all simulated CPU devices share the same cores, so it is not multiplied)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measure_matmul_flops(n=1024, dtype="float32", device=device), "measured f32 matmul (n=1024)"
    dtype = str(jnp.dtype(compute_dtype))
    peak = peak_flops_for_device(device, dtype)
    if peak is None:
        return None, f"no peak known for {device.device_kind}"
    return peak * jax.device_count(), f"{device.device_kind} {dtype} peak x {jax.device_count()}"


def step_cost_metrics(train_step, state, batch, model, tx, schedule, layout, *, grad_accum, batch_size, seq_len,
                      probes, max_segment_len=0) -> dict:
    """The start-of-run perf metrics (FLOPs per step and per token, compiled and analytic)."""
    counted, source = train_step_flops(
        train_step, state, batch, model, tx, schedule, layout, grad_accum=grad_accum, seq_len=seq_len, probes=probes,
        max_segment_len=max_segment_len,
    )
    analytic, how = flops_lib.analytic_train_flops(model, state.params, batch_size, seq_len, max_segment_len)
    return {
        "perf/flops_per_step": counted,
        "perf/flops_per_token": counted / (batch_size * seq_len),
        "perf/flops_per_step_analytic": analytic,
        "source": source,
        "analytic_counts": how,
    }
