"""Linear probes on every layer: entitylens's batched solver vs scikit-learn, same data, same split, one process.

Default shape follows DESIGN section 5: 31 layers, 1,200 training + 300 test examples, d_model 576, on
synthetic but boxes-structured features (7 queried-box rows per state, 0-3 of 100 objects per box, a
shared per-state nuisance, anisotropic residual-stream-like noise, signal growing with depth). Targets:

* ``binary`` (default): "object o is in the queried box" for 48 objects (independent sparse binary targets);
* ``multiclass``: which object is in the queried box (100 objects + "nothing": a 101-way softmax).

Two comparisons, both on every layer by default:

* **CV** -- what ``fit_probes`` / ``entitylens probe`` run by default: L2 strength chosen per target from a
  C grid by group-fold cross-validation (held-out log loss), then a refit on the training split; against
  ``LogisticRegressionCV`` with the same folds, grid and scoring, per target and layer.
* **fixed C** -- one ``LogisticRegression(C)`` per target and layer against ``fit_probes`` with ``Cs=(C,)``.

Per chunk of layers the two methods run back to back, alternating which goes first, so both see the same
machine load; times are summed per method. Both get the same number of BLAS/OpenMP threads
(``--threads``; scikit-learn via threadpoolctl) unless ``--sklearn-threads default`` leaves scikit-learn
at its own default.

Run: ``python benchmarks/probes_vs_sklearn.py`` (about 10 minutes, nearly all of it scikit-learn's CV);
``--compare fixed`` or ``--compare cv`` for one of them, ``--layers 4`` for a quick look.
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
    print(f"    iterations per layer: scikit-learn {it_sk.mean():.1f} per target (max {it_sk.max(1).mean():.1f}); "
          f"ours {it_ours.mean():.1f} per target (max {it_ours.max(1).mean():.1f}, every target batched)")
    print(f"    one batched gradient evaluation (two float32 products, {n}x{d + 1} by {d + 1}x{outputs}): "
          f"{t_eval * 1e3:.2f} ms per layer; ours spent {t_ours / layers * 1e3:.0f} ms per layer = "
          f"{t_ours / layers / t_eval:.0f} of them")
    print(f"    {target:.0f}x would leave {budget * 1e3:.1f} ms per layer = {budget / t_eval:.1f} gradient "
          f"evaluations for every target together, standardising and preconditioning included")


def interleaved(chunks, ours, theirs):
    """Run ``ours(chunk)`` and ``theirs(chunk)`` for every chunk, alternating which goes first; summed times."""
    t_ours = t_sk = 0.0
    out_ours, out_sk = [], []
    for k, chunk in enumerate(chunks):
        for first in ((0, 1) if k % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            if first == 0:
                out_ours.append(ours(chunk))
                t_ours += time.perf_counter() - t
            else:
                out_sk.append(theirs(chunk))
                t_sk += time.perf_counter() - t
        print(f"    layers {chunk[0]:2d}-{chunk[-1]:2d}: ours {t_ours:7.2f}s  sklearn {t_sk:7.2f}s (cumulative)",
              flush=True)
    return t_ours, t_sk, out_ours, out_sk


def accuracy_rows(pred, y):
    """Per-layer test accuracy (mean over targets) and per-(layer, target) accuracy of ``pred`` [layer, n(, T)]."""
    hit = pred == y
    per_t = hit.mean(1) if y.ndim == 2 else hit.mean(1)[:, None]
    return per_t.mean(1), per_t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=31)
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--targets", type=int, default=48, help="binary targets (objects) for --task binary")
    ap.add_argument("--task", choices=["binary", "multiclass", "both"], default="binary")
    ap.add_argument("--compare", choices=["cv", "fixed", "both"], default="both")
    ap.add_argument("--C", type=float, default=1.0, help="C of the fixed-C comparison")
    ap.add_argument("--Cs", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0], help="C grid of the CV comparison")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-4, help="same stopping tolerance for both (sklearn's default)")
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for both methods")
    ap.add_argument("--sklearn-threads", choices=["same", "default"], default="same")
    ap.add_argument("--chunk", type=int, default=8, help="layers per interleaved timing chunk")
    ap.add_argument("--cv-layers", type=int, default=None, help="layers in the CV comparison, evenly spaced "
                    "(default: all)")
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
    import scipy
    import sklearn

    print(f"versions: torch {torch.__version__}, scikit-learn {sklearn.__version__}, scipy {scipy.__version__}")
    print(f"threads: torch {args.threads}, scikit-learn {sk_limit or 'default'}; load average at start "
          f"{os.getloadavg()[0]:.1f} (both methods interleaved per chunk of layers)")
    Xt = torch.from_numpy(X)
    summary = []

    def sk(fn, *a):
        with threadpool_limits(limits=sk_limit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*a)

    for name, y in tasks.items():
        yt = y[te]
        outputs = y.shape[1] if y.ndim == 2 else len(np.unique(y[tr]))
        print(f"\n=== {name}: " + (f"{y.shape[1]} binary targets (object in queried box)" if y.ndim == 2 else
                                  f"{outputs}-class softmax (which object is in the queried box)"))
        if args.compare in ("fixed", "both"):
            print(f"  -- fixed C = {args.C}: LogisticRegression per target and layer vs fit_probes(Cs=({args.C},))")
            cfg = ProbeConfig(Cs=(args.C,), tol=args.tol, max_iter=args.max_iter, dtype=args.dtype, seed=args.seed)
            chunks = [list(range(l0, min(args.layers, l0 + args.chunk))) for l0 in range(0, args.layers, args.chunk)]

            def ours(layers, y=y, cfg=cfg):
                res = fit_probes(Xt[layers], torch.from_numpy(y), groups, cfg, split=split)
                return res.predictions().numpy(), res.n_iter.numpy()

            def theirs(layers, y=y):
                fits = sk(lambda: [sklearn_fit(X[layer], y, tr, te, args.C, args.tol, args.max_iter)
                                   for layer in layers])
                return np.stack([f[0] for f in fits]), np.stack([f[1] for f in fits])

            t_ours, t_sk, o, s_ = interleaved(chunks, ours, theirs)
            acc_o, pt_o = accuracy_rows(np.concatenate([p for p, _ in o]), yt)
            acc_s, pt_s = accuracy_rows(np.concatenate([p for p, _ in s_]), yt)
            print("    layer  acc_ours  acc_sklearn   diff")
            for layer in range(args.layers):
                print(f"    {layer:5d}  {acc_o[layer]:8.4f}  {acc_s[layer]:11.4f}  {acc_o[layer] - acc_s[layer]:+.4f}")
            print(f"    max |accuracy difference| over layers: {np.abs(acc_o - acc_s).max() * 100:.2f} points"
                  + (f" (worst single target: {np.abs(pt_o - pt_s).max() * 100:.2f} points)" if y.ndim == 2 else ""))
            ratio = t_sk / t_ours
            print(f"    time: ours {t_ours:.2f}s, sklearn {t_sk:.2f}s -> speed ratio {ratio:.1f}x "
                  f"(fixed C={args.C}, tol={args.tol}, {args.layers} layers)")
            report_budget(t_sk, t_ours, np.concatenate([i for _, i in s_]), np.concatenate([i for _, i in o]),
                          len(tr), args.d_model, outputs)
            summary.append((name, "fixed C", ratio, np.abs(acc_o - acc_s).max() * 100, None))

        if args.compare in ("cv", "both"):
            Cs = tuple(args.Cs)
            lc = args.cv_layers or args.layers
            layers = np.unique(np.linspace(0, args.layers - 1, lc).round().astype(int))
            print(f"  -- CV: {len(Cs)} Cs x {args.folds} group folds (held-out log loss, C per target) + refit, "
                  f"{len(layers)} layers: LogisticRegressionCV per target and layer vs fit_probes")
            cfg_cv = ProbeConfig(Cs=Cs, folds=args.folds, select="target", tol=args.tol, max_iter=args.max_iter,
                                 dtype=args.dtype, seed=args.seed)
            fold = group_folds(groups[tr], args.folds, args.seed).numpy()
            cv = [(np.where(fold != f)[0], np.where(fold == f)[0]) for f in range(args.folds)]
            chunks = [list(layers[i:i + args.chunk]) for i in range(0, len(layers), args.chunk)]

            def ours_cv(ls, y=y, cfg=cfg_cv):
                res = fit_probes(Xt[ls], torch.from_numpy(y), groups, cfg, split=split)
                return res.predictions().numpy(), res.C.numpy().reshape(len(ls), -1)

            def theirs_cv(ls, y=y, Cs=Cs, cv=cv):
                out = sk(lambda: [sklearn_cv(X[layer], y, tr, te, Cs, cv, args.tol, args.max_iter) for layer in ls])
                return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])

            t_ours, t_sk, o, s_ = interleaved(chunks, ours_cv, theirs_cv)
            acc_o, _ = accuracy_rows(np.concatenate([p for p, _ in o]), yt)
            acc_s, _ = accuracy_rows(np.concatenate([p for p, _ in s_]), yt)
            same_C = np.mean(np.isclose(np.concatenate([c for _, c in o]), np.concatenate([c for _, c in s_])))
            ratio = t_sk / t_ours
            print(f"    CV: ours {t_ours:.2f}s, sklearn LogisticRegressionCV {t_sk:.2f}s -> speed ratio {ratio:.1f}x")
            print(f"    CV: same C chosen for {same_C * 100:.1f}% of (layer, target); max |test accuracy difference| "
                  f"{np.abs(acc_o - acc_s).max() * 100:.2f} points over {len(layers)} layers")
            summary.append((name, "CV", ratio, np.abs(acc_o - acc_s).max() * 100, same_C))

    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    print("summary (target: >= 20x with equal accuracy):")
    for name, kind, ratio, diff, same_C in summary:
        extra = f", same C {same_C * 100:.1f}%" if same_C is not None else ""
        print(f"  {name:10s} {kind:8s} speed ratio {ratio:5.1f}x  max accuracy difference {diff:.2f} points{extra}")


if __name__ == "__main__":
    main()
