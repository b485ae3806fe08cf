"""Linear probes on every layer: entitylens's batched solver vs scikit-learn, same data, same split, one process.

Default shape follows DESIGN section 5: 31 layers, 1,200 training + 300 test examples, d_model 576, on
synthetic but boxes-structured features (7 queried-box rows per state, 0-3 of 100 objects per box, a
shared per-state nuisance, anisotropic residual-stream-like noise, signal growing with depth). Targets:

* ``binary``: "object o is in the queried box" for 48 objects (independent sparse binary targets);
* ``multiclass``: which object is in the queried box (100 objects + "nothing": a 101-way softmax).

Per chunk of layers the two methods run back to back, alternating which goes first, so both see the same
machine load (this machine's other core is shared); times are summed per method. Both get the same
number of BLAS/OpenMP threads (``--threads``; scikit-learn via threadpoolctl) unless
``--sklearn-threads default`` leaves scikit-learn at its own default (what DESIGN section 5 measured).

``--cv`` also compares the cross-validated pipeline: ``fit_probes`` over a C grid (group folds, held-out log
loss, C per target) against ``LogisticRegressionCV`` with the same folds, grid and scoring, per target.

Run: ``python benchmarks/probes_vs_sklearn.py`` (add ``--cv`` for the CV comparison; ``--layers 4`` for a
quick look).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

from entitylens.probing import ProbeConfig, fit_probes, group_folds, split_by_group


def boxes_like_features(layers: int, n: int, d: int, n_objects: int, seed: int):
    """Features ``[layer, n, d]``, multi-hot contents ``[n, n_objects]`` of the queried box, groups (states)."""
    rng = np.random.default_rng(seed)
    n_states = -(-n // 7)
    contents = np.zeros((n_states * 7, n_objects), dtype=bool)
    box = np.tile(np.arange(7), n_states)
    for s in range(n_states):
        pool = rng.permutation(n_objects)
        k = np.minimum(rng.poisson(2.0, 7), 3)
        start = 0
        for b in range(7):
            contents[s * 7 + b, pool[start:start + k[b]]] = True
            start += k[b]
    contents, box = contents[:n], box[:n]
    groups = np.arange(n) // 7
    emb_obj = rng.standard_normal((n_objects, d)) / np.sqrt(d) * 6
    emb_box = rng.standard_normal((7, d)) / np.sqrt(d) * 6
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spectrum = 3.0 / np.sqrt(1.0 + np.arange(d))
    spectrum[:4] *= 8  # a few massive directions, as in real residual streams
    X = np.empty((layers, n, d), dtype=np.float32)
    for layer in range(layers):
        s = 2.5 * (layer / max(layers - 1, 1)) ** 1.5
        state = rng.standard_normal((n_states, d))[groups] * 0.5
        noise = (rng.standard_normal((n, d)) * spectrum) @ q.T
        X[layer] = s * (contents @ emb_obj) + emb_box[box] + state + noise + rng.standard_normal(d) * 3
    return X, contents, groups


def sklearn_fit(X, y, tr, te, C, tol, max_iter):
    """Predictions on the test rows and L-BFGS iterations per target (one for a softmax)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(X[tr])
    A, B = sc.transform(X[tr]), sc.transform(X[te])
    if y.ndim == 2:
        fits = [LogisticRegression(C=C, tol=tol, max_iter=max_iter).fit(A, y[tr, t]) for t in range(y.shape[1])]
        return np.stack([m.predict(B) for m in fits], 1), np.array([int(m.n_iter_[0]) for m in fits])
    m = LogisticRegression(C=C, tol=tol, max_iter=max_iter).fit(A, y[tr])
    return m.predict(B), np.array([int(m.n_iter_[0])])


def gradient_eval_seconds(n: int, d: int, outputs: int, reps: int = 20) -> float:
    """Seconds per layer for one batched gradient evaluation: the two float32 products every first-order
    step needs (logits ``Z @ W`` over all outputs, gradient ``Z.T @ R``), ``Z`` of ``[n, d + 1]``."""
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(n, d + 1, generator=g)
    W = torch.randn(d + 1, outputs, generator=g)
    R = torch.randn(n, outputs, generator=g)
    times = []
    for _ in range(reps + 3):
        t = time.perf_counter()
        Z @ W
        Z.mT @ R
        times.append(time.perf_counter() - t)
    return float(np.median(times[3:]))


def sklearn_cv(X, y, tr, te, Cs, cv, tol, max_iter):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(X[tr])
    A, B = sc.transform(X[tr]), sc.transform(X[te])

    def one(target):
        m = LogisticRegressionCV(Cs=list(Cs), cv=cv, scoring="neg_log_loss", tol=tol, max_iter=max_iter,
                                 l1_ratios=(0.0,), use_legacy_attributes=False).fit(A, target)
        return m.predict(B), float(np.ravel(m.C_)[0])

    if y.ndim == 2:
        out = [one(y[tr, t]) for t in range(y.shape[1])]
        return np.stack([o[0] for o in out], 1), np.array([o[1] for o in out])
    p, c = one(y[tr])
    return p, np.array([c])


def report_budget(t_sk: float, t_ours: float, it_sk: np.ndarray, it_ours: np.ndarray, n: int, d: int,
                  outputs: int, target: float = 20.0) -> None:
    """Print what ``target``x would leave per layer, in batched gradient evaluations, next to the iterations
    both solvers used (``it_*``: ``[layer, target]`` L-BFGS iterations)."""
    layers = it_sk.shape[0]
    t_eval = gradient_eval_seconds(n, d, outputs)
    budget = t_sk / target / layers
    print(f"  iterations per layer: scikit-learn {it_sk.mean():.1f} per target (max {it_sk.max(1).mean():.1f}); "
          f"ours {it_ours.mean():.1f} per target (max {it_ours.max(1).mean():.1f}, every target batched)")
    print(f"  one batched gradient evaluation (two float32 products, {n}x{d + 1} by {d + 1}x{outputs}): "
          f"{t_eval * 1e3:.2f} ms per layer; ours spent {t_ours / layers * 1e3:.0f} ms per layer = "
          f"{t_ours / layers / t_eval:.0f} of them")
    print(f"  {target:.0f}x would leave {budget * 1e3:.1f} ms per layer = {budget / t_eval:.1f} gradient "
          f"evaluations for every target together, standardising and preconditioning included")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=31)
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--targets", type=int, default=48, help="binary targets (objects) for --task binary")
    ap.add_argument("--task", choices=["binary", "multiclass", "both"], default="both")
    ap.add_argument("--C", type=float, default=1.0, help="C of the fixed-C comparison")
    ap.add_argument("--tol", type=float, default=1e-4, help="same stopping tolerance for both (sklearn's default)")
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for both methods")
    ap.add_argument("--sklearn-threads", choices=["same", "default"], default="same")
    ap.add_argument("--chunk", type=int, default=8, help="layers per interleaved timing chunk")
    ap.add_argument("--cv", action="store_true", help="also compare the cross-validated pipelines")
    ap.add_argument("--cv-layers", type=int, default=None, help="layers in the CV comparison (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    sk_limit = args.threads if args.sklearn_threads == "same" else None
    n = args.train + args.test
    t0 = time.perf_counter()
    X, contents, groups = boxes_like_features(args.layers, n, args.d_model, 100, args.seed)
    split = split_by_group(groups, args.test / n, args.seed)
    tr, te = split.train.numpy(), split.test.numpy()
    tasks = {}
    if args.task in ("binary", "both"):
        tasks["binary"] = contents[:, : args.targets]
    if args.task in ("multiclass", "both"):
        tasks["multiclass"] = np.where(contents.any(1), contents.argmax(1), 100)
    print(f"data: {args.layers} layers x {n} examples ({len(tr)} train / {len(te)} test, split by state) x "
          f"{args.d_model} dims, built in {time.perf_counter() - t0:.1f}s")
    print(f"threads: torch {args.threads}, scikit-learn {sk_limit or 'default'}; load average at start "
          f"{os.getloadavg()[0]:.1f} (2-core machine shared with other jobs: both methods interleaved per chunk)")
    Xt = torch.from_numpy(X)

    for name, y in tasks.items():
        print(f"\n=== {name}: " + (f"{y.shape[1]} binary targets (object in queried box)" if y.ndim == 2 else
                                  f"{len(np.unique(y[tr]))}-class softmax (which object is in the queried box)"))
        cfg = ProbeConfig(Cs=(args.C,), tol=args.tol, max_iter=args.max_iter, dtype=args.dtype, seed=args.seed)
        t_ours = t_sk = 0.0
        acc_ours = np.zeros(args.layers)
        acc_sk = np.zeros(args.layers)
        worst_target = 0.0
        it_ours, it_sk = [], []
        for k, l0 in enumerate(range(0, args.layers, args.chunk)):
            l1 = min(args.layers, l0 + args.chunk)
            for first in ((0, 1) if k % 2 == 0 else (1, 0)):
                if first == 0:
                    t = time.perf_counter()
                    res = fit_probes(Xt[l0:l1], torch.from_numpy(y), groups, cfg, split=split)
                    t_ours += time.perf_counter() - t
                    pred_ours = res.predictions().numpy()
                    it_ours.append(res.n_iter.numpy())
                else:
                    t = time.perf_counter()
                    with threadpool_limits(limits=sk_limit), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fits = [sklearn_fit(X[layer], y, tr, te, args.C, args.tol, args.max_iter)
                                for layer in range(l0, l1)]
                    pred_sk = np.stack([f[0] for f in fits])
                    it_sk.append(np.stack([f[1] for f in fits]))
                    t_sk += time.perf_counter() - t
            yt = y[te]
            if y.ndim == 2:
                per_t_ours, per_t_sk = (pred_ours == yt).mean(1), (pred_sk == yt).mean(1)
                worst_target = max(worst_target, float(np.abs(per_t_ours - per_t_sk).max()))
                acc_ours[l0:l1], acc_sk[l0:l1] = per_t_ours.mean(1), per_t_sk.mean(1)
            else:
                acc_ours[l0:l1], acc_sk[l0:l1] = (pred_ours == yt).mean(1), (pred_sk == yt).mean(1)
            print(f"  layers {l0:2d}-{l1 - 1:2d}: ours {t_ours:7.2f}s  sklearn {t_sk:7.2f}s (cumulative)", flush=True)
        print("  layer  acc_ours  acc_sklearn   diff")
        for layer in range(args.layers):
            diff = acc_ours[layer] - acc_sk[layer]
            print(f"  {layer:5d}  {acc_ours[layer]:8.4f}  {acc_sk[layer]:11.4f}  {diff:+.4f}")
        print(f"  max |accuracy difference| over layers: {np.abs(acc_ours - acc_sk).max() * 100:.2f} points"
              + (f" (worst single target: {worst_target * 100:.2f} points)" if y.ndim == 2 else ""))
        print(f"  time: ours {t_ours:.2f}s, sklearn {t_sk:.2f}s -> speed ratio {t_sk / t_ours:.1f}x "
              f"(fixed C={args.C}, tol={args.tol}, {args.layers} layers)")
        report_budget(t_sk, t_ours, np.concatenate(it_sk), np.concatenate(it_ours), len(tr), args.d_model,
                      y.shape[1] if y.ndim == 2 else len(np.unique(y[tr])))

        if args.cv:
            Cs = (0.01, 0.1, 1.0, 10.0)
            lc = args.cv_layers or args.layers
            layers = np.linspace(0, args.layers - 1, lc).round().astype(int)
            cfg_cv = ProbeConfig(Cs=Cs, folds=5, select="target", tol=args.tol, max_iter=args.max_iter,
                                 dtype=args.dtype, seed=args.seed)
            fold = group_folds(groups[tr], 5, args.seed).numpy()
            cv = [(np.where(fold != f)[0], np.where(fold == f)[0]) for f in range(5)]
            t = time.perf_counter()
            res = fit_probes(Xt[layers], torch.from_numpy(y), groups, cfg_cv, split=split)
            t_cv_ours = time.perf_counter() - t
            t = time.perf_counter()
            with threadpool_limits(limits=sk_limit), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = [sklearn_cv(X[layer], y, tr, te, Cs, cv, args.tol, args.max_iter) for layer in layers]
            t_cv_sk = time.perf_counter() - t
            pred_ours, yt = res.predictions().numpy(), y[te]
            a_o = (pred_ours == (yt if y.ndim == 1 else yt)).reshape(len(layers), len(te), -1).mean((1, 2))
            a_s = np.array([(o[0] == yt).mean() for o in out])
            C_ours = res.C.numpy().reshape(len(layers), -1)
            C_sk = np.stack([o[1] for o in out])
            print(f"  CV ({len(Cs)} Cs x 5 group folds + refit, {lc} layers): ours {t_cv_ours:.2f}s, sklearn "
                  f"LogisticRegressionCV {t_cv_sk:.2f}s -> speed ratio {t_cv_sk / t_cv_ours:.1f}x")
            print(f"  CV: same C chosen for {np.mean(np.isclose(C_ours, C_sk)) * 100:.1f}% of (layer, target); max "
                  f"|test accuracy difference| {np.abs(a_o - a_s).max() * 100:.2f} points")
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
