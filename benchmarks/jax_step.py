"""Share of a JAX AdaLoRA training step spent in ``adalora_core``'s allocator update.

The model is the BERT shape of ``step_time.py`` written in plain JAX (24 layers, hidden 128,
4 heads, intermediate 512, vocabulary 1000, batch 16 x 64, a 2-class head on the first token
through a tanh pooler), with SVD adapters (``init_r`` 12) on query, key, value and every dense
layer: 145 matrices, as transformers' ``BertForSequenceClassification`` with PEFT's default
targets. One step is the jitted forward, backward (orthogonal penalty included) and Adam
update (``jax.block_until_ready``), then the core's part: ``np.asarray`` of the parameters and
gradients, ``rank_allocator(...).update`` in the budgeting phase (importance every step,
allocation every ``deltaT`` steps) and the masking of E. Times are process CPU time on one
thread (``OMP_NUM_THREADS=1`` and XLA's single-thread flags are set before jax is imported),
which leaves out the time other processes hold the cores.

For each seed (random weights and batch) the script runs ``--warmup`` steps, then ``--steps``
measured ones, and prints the median share ``core / (jax + core)`` with its quartiles over
steps; the last line is the median and range over seeds.

    python benchmarks/jax_step.py                      # 3 seeds x 30 steps
    python benchmarks/jax_step.py --seeds 5 --steps 50
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import add_model_args, quantile

from adalora_core import Triplet, rank_allocator


def shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """``{matrix: (in, out)}`` of the adapted matrices, named as in transformers' BERT."""
    h, i = args.hidden, args.intermediate
    out: dict[str, tuple[int, int]] = {}
    for layer in range(args.layers):
        p = f"encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            out[p + "attention.self." + name] = (h, h)
        out[p + "attention.output.dense"] = (h, h)
        out[p + "intermediate.dense"] = (h, i)
        out[p + "output.dense"] = (i, h)
    out["pooler.dense"] = (h, h)
    return out


def init(args: argparse.Namespace, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Random base weights (``W`` stored ``(in, out)``, biases, embeddings) and adapters."""
    rng = np.random.default_rng(seed)
    base: dict[str, Any] = {
        "embed": rng.normal(0, 0.02, (1000, args.hidden)),
        "position": rng.normal(0, 0.02, (args.seq, args.hidden)),
        "classifier": rng.normal(0, 0.02, (args.hidden, 2)),
    }
    adapters: dict[str, Any] = {}
    for name, (n_in, n_out) in shapes(args).items():
        base[name] = {"W": rng.normal(0, 0.02, (n_in, n_out)), "b": np.zeros(n_out)}
        adapters[name] = {
            "A": rng.normal(0, 0.02, (args.rank, n_in)),
            "E": np.zeros((args.rank, 1)),
            "B": rng.normal(0, 0.02, (n_out, args.rank)),
        }
    as32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    return as32(base), as32(adapters)


def make_step(args: argparse.Namespace, base: dict[str, Any]) -> tuple[Any, Any]:
    """``(optimizer init, jitted step)``: forward, backward and Adam on the adapters."""
    scale = 8.0 / (args.rank + 1e-5)
    heads, h = args.heads, args.hidden

    def dense(x: Any, name: str, adapters: dict[str, Any]) -> Any:
        a = adapters[name]
        y = x @ base[name]["W"] + base[name]["b"]
        return y + (x @ a["A"].T * (a["E"][:, 0] * scale)) @ a["B"].T

    def norm(x: Any) -> Any:
        mean = x.mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-12)

    def loss(adapters: dict[str, Any], ids: Any, labels: Any) -> Any:
        x = norm(base["embed"][ids] + base["position"])
        b, s = ids.shape
        for layer in range(args.layers):
            p = f"encoder.layer.{layer}."
            q, k, v = (
                dense(x, p + "attention.self." + n, adapters).reshape(b, s, heads, h // heads)
                for n in ("query", "key", "value")
            )
            att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(h // heads), -1)
            ctx = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, h)
            x = norm(x + dense(ctx, p + "attention.output.dense", adapters))
            ff = jax.nn.gelu(dense(x, p + "intermediate.dense", adapters))
            x = norm(x + dense(ff, p + "output.dense", adapters))
        pooled = jnp.tanh(dense(x[:, 0], "pooler.dense", adapters))
        logits = pooled @ base["classifier"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        eye = jnp.eye(args.rank)
        orth = [jnp.linalg.norm(a["A"] @ a["A"].T - eye) for a in adapters.values()]
        orth += [jnp.linalg.norm(a["B"].T @ a["B"] - eye) for a in adapters.values()]
        return ce + 0.5 * sum(orth) / len(orth)

    optimizer = optax.adam(1e-3)

    @jax.jit
    def step(adapters: Any, opt_state: Any, ids: Any, labels: Any) -> Any:
        grads = jax.grad(loss)(adapters, ids, labels)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, grads

    return optimizer.init, step


def run_seed(args: argparse.Namespace, seed: int) -> list[float]:
    """Per measured step: the core's share of the step's CPU time."""
    base, adapters = init(args, seed)
    rng = np.random.default_rng(seed + 1)
    ids = jnp.asarray(rng.integers(0, 1000, (args.batch, args.seq)))
    labels = jnp.asarray(rng.integers(0, 2, args.batch))
    opt_init, step = make_step(args, base)
    opt_state = opt_init(adapters)
    names = list(adapters)
    total = args.warmup + args.steps
    allocator = rank_allocator(
        target_r=args.target_r, tinit=0, tfinal=0, total_step=100 * total, deltaT=args.deltaT
    )

    def triplets(tree: dict[str, Any]) -> list[Triplet]:
        return [Triplet(*(np.asarray(tree[n][k]) for k in "AEB")) for n in names]

    state = allocator.init(triplets(adapters))
    shares = []
    for t in range(1, total + 1):  # step 0 would be the warm-up step tinit=0
        start = time.process_time()
        adapters, opt_state, grads = jax.block_until_ready(step(adapters, opt_state, ids, labels))
        middle = time.process_time()
        state = allocator.update(state, t, triplets(adapters), triplets(grads))
        if state.apply:
            for name, keep in zip(names, state.masks):
                adapters[name] = {**adapters[name], "E": adapters[name]["E"] * keep[:, None]}
        end = time.process_time()
        if t > args.warmup:
            shares.append((end - middle) / (end - start))
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--deltaT", type=int, default=10, help="steps between allocations")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(
        f"{args.layers} layers, hidden {args.hidden}, {len(shapes(args))} matrices, init_r "
        f"{args.rank}, batch {args.batch} x {args.seq}, jax {jax.__version__}, one thread"
    )
    medians = []
    for seed in range(args.seeds):
        shares = run_seed(args, seed)
        medians.append(statistics.median(shares))
        print(
            f"seed {seed}: core share of the step {medians[-1]:.1%} "
            f"(quartiles {quantile(shares, 0.25):.1%} - {quantile(shares, 0.75):.1%}, "
            f"{len(shares)} steps)"
        )
    print(
        f"median over {args.seeds} seeds: {statistics.median(medians):.1%} "
        f"(range {min(medians):.1%} - {max(medians):.1%})"
    )


if __name__ == "__main__":
    main()
