"""Train/test splits and cross-validation folds by group (state), optionally with held-out objects.

Probe examples come in groups: the rows of one state (one prompt) share almost everything, so a state
must never be on both sides of a split. Every function here is deterministic for a seed and depends only
on the group *values* (not on the order of the examples), so the same state lands on the same side
however the examples are ordered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from entitylens.errors import EntitylensError

GroupsLike = Tensor | np.ndarray | Sequence[object]


def group_codes(groups: GroupsLike) -> Int[Tensor, " n"]:
    """Map arbitrary group labels (ints, strings such as ``State.state_id``) to dense int64 codes.

    Codes follow the sorted order of the distinct values, so they do not depend on example order.

    Args:
        groups: One group label per example.

    Returns:
        An int64 tensor of codes ``0 .. G-1``.
    """
    if isinstance(groups, Tensor):
        if groups.ndim != 1:
            raise EntitylensError(f"groups must be 1-D (one label per example), got shape {tuple(groups.shape)}; "
                                  "pass one state id per example")
        _, inv = torch.unique(groups.detach().cpu(), return_inverse=True)
        return inv.to(torch.int64)
    arr = np.asarray(groups)
    if arr.ndim != 1:
        raise EntitylensError(f"groups must be 1-D (one label per example), got shape {arr.shape}; "
                              "pass one state id per example")
    _, inv = np.unique(arr, return_inverse=True)
    return torch.as_tensor(inv.reshape(-1), dtype=torch.int64)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


@dataclass(frozen=True)
class Split:
    """A train/test split of example indices.

    Attributes:
        train: Sorted indices of training examples.
        test: Sorted indices of test examples.
        heldout_objects: Objects held out of training (disjoint-object splits); empty otherwise.
        test_heldout: For each test example, whether it involves a held-out object (all False when no
            objects are held out). Report metrics on both parts to see generalisation to unseen objects.
        dropped: Indices in neither part: examples of training states that involve a held-out object
            (they cannot train without leaking the object, nor test without putting their state on both sides).
    """

    train: Int[Tensor, " n_train"]
    test: Int[Tensor, " n_test"]
    heldout_objects: tuple[int, ...] = ()
    test_heldout: Bool[Tensor, " n_test"] | None = None
    dropped: Int[Tensor, " n_dropped"] = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def __post_init__(self) -> None:
        if self.test_heldout is None:
            object.__setattr__(self, "test_heldout", torch.zeros(len(self.test), dtype=torch.bool))
        if len(set(self.train.tolist()) & set(self.test.tolist())):
            raise EntitylensError("a split has examples on both sides; build it with split_by_group")


def split_by_group(
    groups: GroupsLike,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    objects: Bool[Tensor, "n num_objects"] | None = None,
    heldout_objects: Sequence[int] | None = None,
    heldout_object_fraction: float = 0.0,
) -> Split:
    """Split examples into train and test so that no group (state) is on both sides.

    Groups are shuffled with ``seed`` and taken into the test set until it holds at least
    ``test_fraction`` of the examples. Optionally some objects are held out of training: every example
    that involves one (per ``objects``) is kept out of the training set, so those objects are seen only
    at test time.

    Args:
        groups: One group label per example (e.g. ``State.state_id``).
        test_fraction: Target fraction of examples in the test set, in (0, 1).
        seed: Seed of the shuffle.
        objects: Multi-hot ``[n, num_objects]`` matrix of the objects each example involves (e.g. its
            label set). Needed for a disjoint-object split.
        heldout_objects: Object indices to hold out (explicit).
        heldout_object_fraction: Or: hold out this fraction of the objects that occur, drawn with ``seed``.

    Returns:
        The :class:`Split`.
    """
    codes = group_codes(groups)
    n = len(codes)
    if not 0.0 < float(test_fraction) < 1.0:
        raise EntitylensError(f"test_fraction must be in (0, 1), got {test_fraction}; use e.g. 0.2")
    num_groups = int(codes.max()) + 1 if n else 0
    if num_groups < 2:
        raise EntitylensError(f"need at least 2 distinct groups (states) to split, got {num_groups}; "
                              "probe examples from more states")
    gen = _generator(seed)
    order = torch.randperm(num_groups, generator=gen)
    sizes = torch.bincount(codes, minlength=num_groups)
    cum = torch.cumsum(sizes[order], 0)
    target = float(test_fraction) * n
    n_test_groups = int(torch.searchsorted(cum.double(), torch.tensor(target, dtype=torch.float64)).item()) + 1
    n_test_groups = min(max(n_test_groups, 1), num_groups - 1)
    is_test_group = torch.zeros(num_groups, dtype=torch.bool)
    is_test_group[order[:n_test_groups]] = True
    is_test = is_test_group[codes]

    held: tuple[int, ...] = ()
    involves = torch.zeros(n, dtype=torch.bool)
    if heldout_objects is not None or heldout_object_fraction:
        if objects is None:
            raise EntitylensError("a disjoint-object split needs objects=[n, num_objects] multi-hot; "
                                  "pass which objects each example involves")
        obj = torch.as_tensor(objects).to(torch.bool).cpu()
        if obj.ndim != 2 or obj.shape[0] != n:
            raise EntitylensError(f"objects must have shape [n={n}, num_objects], got {tuple(obj.shape)}; "
                                  "pass one multi-hot row per example")
        if heldout_objects is not None:
            held = tuple(sorted({int(o) for o in heldout_objects}))
            if any(o < 0 or o >= obj.shape[1] for o in held):
                raise EntitylensError(f"heldout_objects must be in 0..{obj.shape[1] - 1}; fix the object indices")
        else:
            if not 0.0 < float(heldout_object_fraction) < 1.0:
                raise EntitylensError(f"heldout_object_fraction must be in (0, 1), got {heldout_object_fraction}")
            present = torch.nonzero(obj.any(0)).flatten()
            k = max(1, round(float(heldout_object_fraction) * len(present)))
            pick = torch.randperm(len(present), generator=_generator(seed + 1))[:k]
            held = tuple(sorted(present[pick].tolist()))
        involves = obj[:, list(held)].any(1) if held else involves
    train_mask = ~is_test & ~involves
    dropped = torch.nonzero(~is_test & involves).flatten()
    train = torch.nonzero(train_mask).flatten()
    test = torch.nonzero(is_test).flatten()
    if len(train) == 0:
        raise EntitylensError("the split left no training examples; hold out fewer objects or use more states")
    return Split(train=train, test=test, heldout_objects=held, test_heldout=involves[test], dropped=dropped)


def group_folds(groups: GroupsLike, folds: int, seed: int = 0) -> Int[Tensor, " n"]:
    """Assign each example a cross-validation fold so that every group lies in exactly one fold.

    Groups are shuffled with ``seed``, ordered by size (largest first, stable), and each is given to the
    fold with the fewest examples so far (lowest index on ties) -- balanced folds, deterministic.

    Args:
        groups: One group label per example.
        folds: Number of folds (>= 2).
        seed: Seed of the shuffle.

    Returns:
        Fold index ``0 .. folds-1`` per example.
    """
    codes = group_codes(groups)
    num_groups = int(codes.max()) + 1 if len(codes) else 0
    if folds < 2:
        raise EntitylensError(f"folds must be >= 2, got {folds}; use e.g. 5")
    if num_groups < folds:
        raise EntitylensError(f"{num_groups} groups (states) cannot fill {folds} folds; use folds <= {num_groups} "
                              "or more states")
    sizes = torch.bincount(codes, minlength=num_groups)
    order = torch.randperm(num_groups, generator=_generator(seed))
    order = order[torch.sort(sizes[order], descending=True, stable=True).indices]
    load = [0] * folds
    fold_of_group = torch.empty(num_groups, dtype=torch.int64)
    for gid in order.tolist():
        f = min(range(folds), key=lambda i: (load[i], i))
        fold_of_group[gid] = f
        load[f] += int(sizes[gid])
    return fold_of_group[codes]
