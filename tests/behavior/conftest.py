"""Fixtures for the decoding tests: KST24 prompts built from DESIGN §2's template, a completing tiny model.

The prompt text is written out here from the paper's template (independently of
``entitylens.task.prompts``) so the decoding tests check the engine against the protocol itself.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from decode_helpers import separator_bias

KST24_INSTRUCTION = (
    'Given the description after "Description:", write a true statement about all boxes and their contents '
    'to the description after "Statement:".'
)
_DEMO1 = (
    "Box 0 contains the car, Box 1 contains the cross, Box 2 contains the bag and the machine, Box 3 contains "
    "the paper and the string, Box 4 contains the bill, Box 5 contains the apple and the cash and the glass, "
    "Box 6 contains the bottle and the map."
)
_DEMO2 = (
    _DEMO1 + " Remove the car from Box 0. Remove the paper and the string from Box 3. Put the plane into Box 0. "
    "Move the map from Box 6 to Box 2. Remove the bill from Box 4. Put the coat into Box 3."
)
_DEMO2_STATEMENT = (
    "Box 0 contains the plane, Box 1 contains the cross, Box 2 contains the bag and the machine and the map, "
    "Box 3 contains the coat, Box 4 contains nothing, Box 5 contains the apple and the cash and the glass, "
    "Box 6 contains the bottle."
)
KST24_SHARED_PREFIX = (
    f"{KST24_INSTRUCTION}\n\nDescription: {_DEMO1}\nStatement: {_DEMO1}\n\n"
    f"Description: {_DEMO2}\nStatement: {_DEMO2_STATEMENT}\n\nDescription:"
)
"""Everything before the test description (2 demonstrations), as DESIGN §2 writes it."""

_NOUNS = (
    "apple bag bell bill boat bone book bottle bread brick cake camera car card cash chain clock coat crown cup "
    "disk egg engine fan file fish flower glass gift guitar hat key kite lamp leaf letter map milk mirror "
    "note paper pen phone plane plate ring rope shirt shoe stone string tea ticket tie toy train tree watch wire "
    "umbrella magnet eggnog television newspaper medicine"
).split()


def _listing(objs: list[str]) -> str:
    return " and ".join(f"the {o}" for o in objs) if objs else "nothing"


def kst24_description(seed: int, num_ops: int = 2) -> str:
    """A random boxes description (initial state + ``num_ops`` put/remove operations), seeded."""
    rng = random.Random(seed)
    objs = rng.sample(_NOUNS, 14)
    boxes = [sorted(objs[2 * i : 2 * i + rng.randint(0, 2)]) for i in range(7)]
    text = [", ".join(f"Box {i} contains {_listing(b)}" for i, b in enumerate(boxes)) + "."]
    for _ in range(num_ops):
        full = [i for i in range(7) if boxes[i]]
        if full and rng.random() < 0.5:
            i = rng.choice(full)
            o = rng.choice(boxes[i])
            boxes[i].remove(o)
            text.append(f"Remove the {o} from Box {i}.")
        else:
            i = rng.randrange(7)
            o = rng.choice([n for n in _NOUNS if n not in objs])
            objs.append(o)
            boxes[i] = sorted([*boxes[i], o])
            text.append(f"Put the {o} into Box {i}.")
    return " ".join(text)


def kst24_prompt(description: str) -> str:
    """The full 2-shot prompt for one test description (no trailing newline)."""
    return f"{KST24_SHARED_PREFIX} {description}"


@pytest.fixture(scope="session")
def kst24_prompts() -> list[str]:
    """Eight KST24 prompts with 0-3 operations each (varied lengths)."""
    return [kst24_prompt(kst24_description(seed, num_ops=seed % 4)) for seed in range(8)]


@pytest.fixture(scope="session")
def short_prompts() -> list[str]:
    """Four short prompts (a description without the demonstrations) for slow reference loops."""
    return [f"Description: {kst24_description(seed, num_ops=1)}" for seed in range(4)]


@pytest.fixture(scope="session")
def kst24_shared_prefix() -> str:
    """The 2-shot prefix every :func:`kst24_prompts` prompt starts with."""
    return KST24_SHARED_PREFIX


@pytest.fixture
def separator_biased_tiny(tiny_model: Any) -> Iterator[Any]:
    """The shared ``tiny:llama`` bridge with a logit bias on ``","`` and ``"."`` so statements complete."""
    with separator_bias(tiny_model) as model:
        yield model
