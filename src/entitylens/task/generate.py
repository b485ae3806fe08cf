"""Generate boxes-task datasets: configuration, scenario stream, states, K&S JSONL files.

A dataset is a list of :class:`~entitylens.task.types.State`. The generator draws scenarios ``0, 1, 2, ...``
of the seed (see :mod:`entitylens.task.world`), skips exact duplicates of an earlier initial state (as K&S
do) and, with ``split`` set, scenarios whose signature belongs to another split
(:func:`~entitylens.task.splits.signature_split`).

``sampling="distinct"`` (default): every state comes from its own scenario, at a prefix length ``k`` drawn
uniformly from ``0 .. max_prefix_ops`` (seeded by the scenario), so a small dataset is not a handful of
scenarios seen at many prefixes -- states that share a scenario share almost their whole text, which lets
a probe look answers up from siblings. ``sampling="prefixes"`` (K&S's generator): every scenario yields all
its prefixes ``k = 0 .. max_prefix_ops`` (13 states for 12 operations), in order, and the first
``num_states`` states are kept. ``sample_id`` is the scenario's index in the seed's stream, so
datasets generated from one seed with different options (variant, form, split, number of states) describe
the same worlds under the same ids. With ``profile="paper"`` the 716 states are selected as described in
:mod:`entitylens.task.profile`.

Train-on-N-ops (K&S's ``trainlen=2`` data): ``max_prefix_ops=N`` keeps only prefixes with at most ``N``
operations of the same 12-operation scenarios; combine with ``split="train"`` and generate the test data
with ``split="test"`` from the same seed.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from entitylens.errors import EntitylensError
from entitylens.progress import progress
from entitylens.task.io import write_ks_jsonl
from entitylens.task.profile import (
    PAPER_NUM_STATES,
    PAPER_NUMOPS_PROFILE,
    instantiate,
    numops_histogram,
    select_profile,
)
from entitylens.task.splits import DEFAULT_FRACTIONS, SPLIT_NAMES, check_fractions, signature_split
from entitylens.task.text import MAX_BOXES, check_form, check_variant, render_context
from entitylens.task.types import MAX_PER_BOX, NUM_BOXES, State
from entitylens.task.vocab import get_vocabulary
from entitylens.task.world import Scenario, count_numops, replay, sample_scenario

PROFILES: tuple[str, ...] = ("paper",)
"""Known profiles (``--profile``)."""

DEFAULT_NUM_STATES = 1000
"""States generated when neither ``num_states`` nor a profile is given."""

SAMPLINGS: tuple[str, ...] = ("distinct", "prefixes")
"""How states are drawn from scenarios (see the module docstring)."""

_OBJECT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
_MAX_REJECTED = 10_000  # consecutive rejected scenarios before giving up (tiny worlds run out of new states)


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that determines a generated dataset (same config → byte-identical file).

    Attributes:
        seed: Dataset seed.
        variant: ``"base"``, ``"altforms"`` or ``"move-contents"``.
        vocab: ``"bnc"`` (the 100 K&S nouns) or ``"disjoint"`` (98 rare nouns); ignored if ``objects``.
        form: ``"fewshot"`` ("contains nothing") or ``"t5"`` ("is empty").
        num_operations: Operations per scenario (12 in the paper).
        num_states: States to emit (default 1000; 716 with the paper profile).
        profile: ``None`` or ``"paper"`` (716 states matching KST24's numops profile exactly).
        max_prefix_ops: Emit only prefixes with at most this many operations (train-on-N-ops).
        split: Keep only scenarios whose signature is in this split (``"train"``, ``"dev"``, ``"test"``).
        split_fractions: Train/dev/test fractions of the signature space used by ``split``.
        num_boxes: Number of boxes (7).
        max_per_box: Capacity of a box (3).
        expected_per_box: Poisson mean of initial objects per box (2).
        objects: A custom object vocabulary (overrides ``vocab``).
        scenario_pool: Scenarios sampled as profile candidates (doubled automatically if too few).
        sampling: ``"distinct"`` (one state per scenario, default) or ``"prefixes"`` (every prefix of each
            scenario, as K&S's generator writes them). Ignored by the paper profile.

    """

    seed: int = 0
    variant: str = "base"
    vocab: str = "bnc"
    form: str = "fewshot"
    num_operations: int = 12
    num_states: int | None = None
    profile: str | None = None
    max_prefix_ops: int | None = None
    split: str | None = None
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    num_boxes: int = NUM_BOXES
    max_per_box: int = MAX_PER_BOX
    expected_per_box: float = 2.0
    objects: tuple[str, ...] | None = None
    scenario_pool: int = 4000
    sampling: str = "distinct"

    def __post_init__(self) -> None:
        def _int(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
                raise EntitylensError(f"{name} must be an integer {rng}, got {v!r}; pass a valid {name}")

        _int("seed", -(2**63), 2**63)
        if self.sampling not in SAMPLINGS:
            raise EntitylensError(f"unknown sampling {self.sampling!r}; use one of: {', '.join(SAMPLINGS)}")
        check_variant(self.variant)
        check_form(self.form)
        _int("num_operations", 0, 10_000)
        if self.num_states is not None:
            _int("num_states", 1)
        if self.profile is not None and self.profile not in PROFILES:
            raise EntitylensError(f"unknown profile {self.profile!r}; use one of: {', '.join(PROFILES)}")
        if self.max_prefix_ops is not None:
            _int("max_prefix_ops", 0, self.num_operations)
        _int("num_boxes", 2, MAX_BOXES)
        _int("max_per_box", 1, 9)
        _int("scenario_pool", 1)
        if not (isinstance(self.expected_per_box, (int, float)) and 0 < self.expected_per_box <= 100):
            raise EntitylensError(
                f"expected_per_box must be a number in (0, 100], got {self.expected_per_box!r}; use e.g. 2"
            )
        object.__setattr__(self, "split_fractions", check_fractions(self.split_fractions))
        if self.split is not None:
            if self.split not in SPLIT_NAMES:
                raise EntitylensError(f"unknown split {self.split!r}; use one of: {', '.join(SPLIT_NAMES)}")
            if self.split_fractions[SPLIT_NAMES.index(self.split)] <= 0:
                raise EntitylensError(f"split {self.split!r} has fraction 0; give it a positive fraction")
        if self.objects is None:
            get_vocabulary(self.vocab)
        else:
            objs = tuple(self.objects)
            object.__setattr__(self, "objects", objs)
            bad = [o for o in objs if not isinstance(o, str) or not _OBJECT_RE.match(o)]
            if bad:
                raise EntitylensError(f"object {bad[0]!r} is not a single word; use names like 'cup' or 'x-ray'")
            if len(set(objs)) != len(objs):
                raise EntitylensError("the object vocabulary lists an object twice; list each object once")
        need = self.num_boxes * self.max_per_box
        if need > len(self.vocabulary):
            raise EntitylensError(
                f"{self.num_boxes} boxes of up to {self.max_per_box} objects need {need} objects "
                "but the vocabulary "
                f"holds {len(self.vocabulary)}; use a larger vocabulary, fewer boxes or a lower max_per_box"
            )
        if self.profile == "paper":
            if self.num_boxes != NUM_BOXES:
                raise EntitylensError(f"the paper profile needs {NUM_BOXES} boxes; drop num_boxes")
            if self.prefix_ops < len(PAPER_NUMOPS_PROFILE) - 1:
                raise EntitylensError(
                    "the paper profile needs prefixes of at least "
                    f"{len(PAPER_NUMOPS_PROFILE) - 1} operations; "
                    "use --ops 12 and no --max-prefix-ops"
                )
            if self.num_states not in (None, PAPER_NUM_STATES):
                raise EntitylensError(
                    f"the paper profile has exactly {PAPER_NUM_STATES} states; drop --states or drop --profile"
                )

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """The object vocabulary in use."""
        return self.objects if self.objects is not None else get_vocabulary(self.vocab)

    @property
    def prefix_ops(self) -> int:
        """Longest prefix emitted (``max_prefix_ops`` or ``num_operations``)."""
        return self.num_operations if self.max_prefix_ops is None else self.max_prefix_ops

    @property
    def total_states(self) -> int:
        """Number of states the config produces."""
        if self.profile == "paper":
            return PAPER_NUM_STATES
        return self.num_states if self.num_states is not None else DEFAULT_NUM_STATES


def make_state(
    scenario: Scenario, k: int, variant: str = "base", form: str = "fewshot", max_per_box: int = MAX_PER_BOX
) -> State:
    """Build the state of a scenario after its first ``k`` operations.

    Args:
        scenario: The scenario.
        k: Prefix length (``0 .. len(scenario.operations)``).
        variant: Surface variant of the context.
        form: ``"fewshot"`` or ``"t5"``.
        max_per_box: Capacity of a box (to validate the replay).

    Returns:
        The state, with ``extra = {"form": form}``.

    """
    if not 0 <= k <= len(scenario.operations):
        raise EntitylensError(
            f"prefix length {k} is outside 0..{len(scenario.operations)}; use a prefix the scenario has"
        )
    ops = scenario.operations[:k]
    n = scenario.num_boxes
    contents = replay(scenario.initial, ops, max_per_box)[-1]
    numops, by_op = count_numops(ops, n)
    return State(
        sample_id=scenario.sample_id,
        initial=scenario.initial,
        operations=ops,
        contents=contents,
        numops=numops,
        numops_by_op=by_op,
        context=render_context(scenario.initial, ops, variant, form),
        variant=variant,
        extra={"form": form},
    )


def scenario_stream(config: GeneratorConfig) -> Iterator[Scenario]:
    """Yield the config's scenarios in order (duplicates of earlier initial states and other splits skipped).

    Raises:
        EntitylensError: If no new scenario turns up for a long time (a tiny world has run out of
            distinct initial states).

    """
    vocab = config.vocabulary
    seen: set[tuple[tuple[str, ...], ...]] = set()
    rejected = 0
    for i in itertools.count():
        sc = sample_scenario(
            config.seed,
            i,
            vocab,
            num_operations=config.num_operations,
            num_boxes=config.num_boxes,
            max_per_box=config.max_per_box,
            expected_per_box=config.expected_per_box,
            move_contents=config.variant == "move-contents",
        )
        ok = config.split is None or signature_split(sc.signature, config.split_fractions, config.seed) == config.split
        if ok and sc.initial not in seen:
            seen.add(sc.initial)
            rejected = 0
            yield sc
        else:
            rejected += 1
            if rejected >= _MAX_REJECTED:
                raise EntitylensError(
                    f"no new scenario in {_MAX_REJECTED} draws "
                    f"(only {len(seen)} distinct initial states found); "
                    "request fewer states or use more boxes/objects"
                )


def _profile_states(config: GeneratorConfig) -> list[State]:
    pool = config.scenario_pool
    last_error: EntitylensError | None = None
    for _attempt in range(4):
        scenarios: list[Scenario] = []
        cand_type: list[int] = []
        cand_group: list[int] = []
        cand_ref: list[tuple[int, int]] = []
        type_index: dict[tuple[int, ...], int] = {}
        stream = scenario_stream(config)
        for si in progress(range(pool), desc="sampling scenarios", unit="scenario"):
            sc = next(stream)
            scenarios.append(sc)
            num = [0] * sc.num_boxes
            for k in range(config.prefix_ops + 1):
                if k > 0:
                    for b in sc.operations[k - 1].boxes:
                        num[b] += 1
                h = numops_histogram(num)
                if h is None:
                    break  # numops only grows along a scenario
                cand_type.append(type_index.setdefault(h, len(type_index)))
                cand_group.append(sc.sample_id)
                cand_ref.append((si, k))
        # canonical (sorted) type order so the greedy's tie-breaking does not depend on discovery order
        types_sorted = sorted(type_index)
        remap = {type_index[t]: j for j, t in enumerate(types_sorted)}
        cand_type = [remap[t] for t in cand_type]
        supply = [0] * len(types_sorted)
        for t in cand_type:
            supply[t] += 1
        try:
            counts = select_profile(types_sorted, supply, PAPER_NUMOPS_PROFILE)
            chosen = instantiate(cand_type, cand_group, counts, config.seed)
        except EntitylensError as e:
            last_error = e
            pool *= 2
            continue
        refs = sorted(cand_ref[i] for i in chosen)
        return [make_state(scenarios[si], k, config.variant, config.form, config.max_per_box) for si, k in refs]
    raise EntitylensError(f"paper profile selection failed even with {pool // 2} scenarios ({last_error})")


def generate_states(config: GeneratorConfig) -> list[State]:
    """Generate the states a config describes.

    Args:
        config: The generator configuration.

    Returns:
        The states, ordered by ``(sample_id, number of operations)``.

    """
    if config.profile == "paper":
        return _profile_states(config)
    want = config.total_states
    per = config.prefix_ops + 1
    states: list[State] = []
    bar = progress(total=want, desc="generating states", unit="state")
    try:
        if config.sampling == "distinct":
            for sc in itertools.islice(scenario_stream(config), want):
                k = random.Random(f"entitylens:prefix:{config.seed}:{sc.sample_id}").randrange(per)
                states.append(make_state(sc, k, config.variant, config.form, config.max_per_box))
                bar.update(1)
            return states
        for sc in itertools.islice(scenario_stream(config), math.ceil(want / per)):
            for k in range(per):
                if len(states) == want:
                    break
                states.append(make_state(sc, k, config.variant, config.form, config.max_per_box))
                bar.update(1)
    finally:
        bar.close()
    return states


def generate_dataset(config: GeneratorConfig, path: str | os.PathLike[str]) -> list[State]:
    """Generate the states of ``config`` and write them as K&S T5 JSONL (atomically).

    Args:
        config: The generator configuration.
        path: Output file (replaced only once the whole file is written).

    Returns:
        The states written.

    """
    states = generate_states(config)
    write_ks_jsonl(path, states)
    return states
