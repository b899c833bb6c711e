"""A small draft model for speculative decoding of SmolLM2-135M, distilled from its greedy output.

    python experiments/smollm_draft.py [--out runs/smollm_draft] [--steps 400]

No smaller model with SmolLM2's tokenizer exists offline, so this script makes one in minutes on
a CPU: (1) SmolLM2-135M-Instruct (imported from its GGUF) continues windows of the *training*
part of Shakespeare greedily (the validation part, where the benchmarks take their prompts,
stays unseen); (2) a draft of `--dim` and `--layers` (default d=128, 2 layers: 6.7M parameters,
20x fewer than the target, almost all of them the tied embedding) starts its embedding from the
top principal directions of SmolLM2's embedding, so tokens begin with the target's geometry;
(3) it learns next-token prediction on the prompt + continuation rows, i.e. to imitate what the
target says. Writes `draft.json` (the TransformerConfig) and `draft.msgpack` (the parameters)
into --out; `load_draft(out)` reads them back.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # XLA:CPU runtime choices must precede the jax import
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmjax.xla_flags import tune_xla_cpu_flags

    tune_xla_cpu_flags()

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm import tqdm

from bench_generate import decode_prompts  # noqa: E402  (experiments/ is on the path when run as a script)
from lmjax.generate.decoder import Decoder, LaneRequests
from lmjax.models.transformer import Transformer, TransformerConfig

CONFIG_FILE, PARAMS_FILE = "draft.json", "draft.msgpack"


def load_smollm2():
    """(model, params, tokenizer) of SmolLM2-135M-Instruct from the bundled GGUF, layers unrolled."""
    from lmjax.interop.bundled import smollm2_gguf
    from lmjax.interop.pretrained import load_pretrained

    pretrained = load_pretrained(smollm2_gguf(), scan_layers=False)
    return Transformer(pretrained.config), jax.device_put(pretrained.params), pretrained.tokenizer


def shakespeare_ids(tokenizer, part: str) -> np.ndarray:
    """Token ids of the training or validation part of Shakespeare (lmjax.data.shakespeare's split)."""
    from lmjax.data.shakespeare import load_text, split_train_val

    train, val = split_train_val(load_text(), 0.05)
    return np.asarray(tokenizer.encode(train if part == "train" else val), np.int32)


def windows(ids: np.ndarray, n: int, length: int) -> np.ndarray:
    """`n` windows of `length` tokens spread evenly over `ids`."""
    starts = np.linspace(0, len(ids) - length - 1, n).astype(int)
    return np.stack([ids[s: s + length] for s in starts])


def target_rows(model, params, prompts: np.ndarray, new_tokens: int, lanes: int) -> np.ndarray:
    """[N, prompt + new_tokens]: each prompt followed by the target's greedy continuation."""
    decoder = Decoder(model, lanes, prompts.shape[1] + new_tokens, chunk=32)
    requests = LaneRequests.empty(lanes).replace(max_new=np.full(lanes, new_tokens, np.int32))
    rows = []
    for start in tqdm(range(0, len(prompts), lanes), desc="target continuations", unit="batch"):
        batch = prompts[start: start + lanes]
        out = decode_prompts(decoder, params, list(batch), requests)
        rows += [np.concatenate([p, np.asarray(o[:new_tokens], np.int32)]) for p, o in zip(batch, out)]
    return np.stack(rows)


def draft_config(target_cfg: TransformerConfig, dim: int, layers: int) -> TransformerConfig:
    heads = max(1, dim // 32)
    return TransformerConfig(
        vocab_size=target_cfg.vocab_size, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads,
        mlp_hidden=3 * dim, tie_embeddings=True, rope_base=target_cfg.rope_base, scan_layers=False,
    )


def init_draft(cfg: TransformerConfig, target_params, seed: int = 0):
    """Fresh draft parameters whose embedding is the target's, projected on its top `cfg.dim`
    principal directions and scaled to the fresh embedding's spread (the target's scale gives
    tied logits so large that training starts at a loss of ~24)."""
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    table = np.asarray(target_params["embed"]["embedding"], np.float64)
    _, _, vt = np.linalg.svd(table, full_matrices=False)
    projected = table @ vt[: cfg.dim].T
    fresh = np.asarray(params["embed"]["embedding"])
    params["embed"]["embedding"] = jnp.asarray(projected * (fresh.std() / projected.std()), jnp.float32)
    return params


def train_draft(cfg: TransformerConfig, params, rows: np.ndarray, steps: int, batch: int, lr: float, seed: int = 0):
    """Next-token training on `rows` (AdamW, warm-up then cosine decay). Returns (params, losses)."""
    model = Transformer(cfg)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 10), steps, lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rows_BxL):
        def loss_fn(p):
            logits = model.apply({"params": p}, rows_BxL[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, rows_BxL[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    with tqdm(range(steps), desc="draft training", unit="step") as bar:
        for _ in bar:
            params, opt_state, loss = step(params, opt_state, rows[rng.integers(0, len(rows), batch)])
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return params, losses


def save_draft(out: Path, cfg: TransformerConfig, params) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / PARAMS_FILE).write_bytes(serialization.to_bytes(jax.device_get(params)))
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))


def load_draft(out) -> tuple[Transformer, dict]:
    """(model, params) saved by this script in `out`."""
    out = Path(out)
    if not (out / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{out} holds no draft; make one with: python experiments/smollm_draft.py --out {out}")
    cfg = TransformerConfig(**json.loads((out / CONFIG_FILE).read_text()))
    template = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return Transformer(cfg), jax.device_put(serialization.from_bytes(template, (out / PARAMS_FILE).read_bytes()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/smollm_draft")
    parser.add_argument("--rows", type=int, default=256, help="target continuations to learn from")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=96)
    parser.add_argument("--lanes", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    out = Path(args.out)
    target, target_params, tokenizer = load_smollm2()
    rows_file = out / "target_rows.npy"
    start = time.perf_counter()
    if rows_file.is_file():
        rows = np.load(rows_file)
    else:
        prompts = windows(shakespeare_ids(tokenizer, "train"), args.rows, args.prompt_len)
        rows = target_rows(target, target_params, prompts, args.new_tokens, args.lanes)
        out.mkdir(parents=True, exist_ok=True)
        np.save(rows_file, rows)
    print(f"{len(rows)} rows of {rows.shape[1]} tokens ({time.perf_counter() - start:.0f} s)", flush=True)
    cfg = draft_config(target.cfg, args.dim, args.layers)
    params = init_draft(cfg, target_params)
    n = lambda p: sum(x.size for x in jax.tree.leaves(p))  # noqa: E731
    print(f"draft {n(params) / 1e6:.1f}M parameters vs target {n(target_params) / 1e6:.1f}M", flush=True)
    start = time.perf_counter()
    params, losses = train_draft(cfg, params, rows, args.steps, args.batch, args.lr)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s: loss {losses[0]:.2f} -> "
          f"{np.mean(losses[-20:]):.2f}", flush=True)
    save_draft(out, cfg, params)
    print(f"saved {out / PARAMS_FILE}")


if __name__ == "__main__":
    main()
