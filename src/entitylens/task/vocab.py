"""Object vocabularies of the boxes task.

``BNC_OBJECTS`` are the 100 common nouns of Kim & Schuster (2023) (their
``data/objects_with_bnc_frequency.csv``), in that file's order (descending BNC frequency).
``DISJOINT_OBJECTS`` are 98 rare nouns (BNC frequency 0) used as the *disjoint vocabulary*: a test set
whose objects never occur in training data built from ``BNC_OBJECTS``.

Both lists are the rows of ``box_datasets/objects_with_bnc_frequency.csv`` from Nix07/finetuning
(Prakash et al. 2024) at commit 9bbc27c75badf720adaf264d106aed4f16344afd, Apache-2.0: rows 1-100 are the
K&S BNC nouns and rows 101-198 the disjoint nouns. They are embedded here (not read from a file) because the
generator needs them at runtime.
"""

from __future__ import annotations

from entitylens.errors import EntitylensError

# Copied from Nix07/finetuning@9bbc27c, box_datasets/objects_with_bnc_frequency.csv, rows 1-100
# (Apache-2.0). They equal sebschu/entity-tracking-lms data/objects_with_bnc_frequency.csv.
BNC_OBJECTS: tuple[str, ...] = (
    "book",
    "car",
    "paper",
    "letter",
    "game",
    "computer",
    "picture",
    "plant",
    "cup",
    "machine",
    "bill",
    "glass",
    "note",
    "stone",
    "fish",
    "drug",
    "television",
    "card",
    "document",
    "rock",
    "radio",
    "ball",
    "tea",
    "file",
    "newspaper",
    "branch",
    "train",
    "cash",
    "fig",
    "flower",
    "bag",
    "boat",
    "key",
    "painting",
    "phone",
    "drink",
    "engine",
    "bus",
    "coffee",
    "sheet",
    "plate",
    "magazine",
    "egg",
    "tape",
    "bottle",
    "block",
    "brain",
    "map",
    "crown",
    "ring",
    "leaf",
    "dress",
    "fan",
    "milk",
    "ticket",
    "shoe",
    "bone",
    "gift",
    "cross",
    "plane",
    "mirror",
    "coat",
    "wheel",
    "string",
    "ice",
    "rose",
    "boot",
    "hat",
    "suit",
    "creature",
    "bomb",
    "camera",
    "bread",
    "cake",
    "meat",
    "beer",
    "shirt",
    "cigarette",
    "jacket",
    "apple",
    "pipe",
    "guitar",
    "disk",
    "medicine",
    "knife",
    "cream",
    "clock",
    "chemical",
    "seed",
    "tie",
    "watch",
    "cheese",
    "bowl",
    "dish",
    "shell",
    "wire",
    "tissue",
    "pot",
    "brick",
    "bell",
)
"""The 100 K&S BNC nouns (the default vocabulary, ``--vocab bnc``)."""

# Copied from Nix07/finetuning@9bbc27c, box_datasets/objects_with_bnc_frequency.csv, rows 101-198
# (Apache-2.0).
DISJOINT_OBJECTS: tuple[str, ...] = (
    "biscotti",
    "otamatone",
    "granite",
    "hematite",
    "contrabass",
    "theremin",
    "encyclopedia",
    "segway",
    "plushie",
    "breadboard",
    "furby",
    "sucklet",
    "folio",
    "ocarina",
    "nametag",
    "monocle",
    "mouthpiece",
    "molar",
    "shortbread",
    "elixir",
    "icicle",
    "gastropod",
    "eggnog",
    "spork",
    "succulent",
    "sabre",
    "tiramisu",
    "puncher",
    "tendon",
    "laminator",
    "shredder",
    "jackknife",
    "edamame",
    "furminator",
    "tricycle",
    "rambutan",
    "cherimoya",
    "drone",
    "eulogy",
    "croffle",
    "frogspawn",
    "parsley",
    "hydrant",
    "protractor",
    "colander",
    "boardgame",
    "thimble",
    "anaconda",
    "chromebook",
    "petroleum",
    "frappuccino",
    "eyeball",
    "gameboy",
    "disinfectant",
    "toaster",
    "zucchini",
    "chartreuse",
    "pomelo",
    "mallard",
    "sealant",
    "sodastream",
    "barbell",
    "incense",
    "compass",
    "clipper",
    "lunchbox",
    "gelcap",
    "adhesive",
    "gavel",
    "hairpiece",
    "mortar",
    "stethoscope",
    "ladybug",
    "sponge",
    "projector",
    "odometer",
    "magnet",
    "vacuum",
    "tunic",
    "scarf",
    "oyster",
    "tusk",
    "taxidermy",
    "neonate",
    "mamba",
    "hanger",
    "spatula",
    "chandelier",
    "lantern",
    "obituary",
    "gumball",
    "beetle",
    "wren",
    "leek",
    "scrunchie",
    "tetrapod",
    "cuboid",
    "prism",
)
"""98 rare nouns disjoint from ``BNC_OBJECTS`` (``--vocab disjoint``)."""

VOCABULARIES: dict[str, tuple[str, ...]] = {"bnc": BNC_OBJECTS, "disjoint": DISJOINT_OBJECTS}
"""Named vocabularies accepted by ``--vocab`` and :class:`~entitylens.task.generate.GeneratorConfig`."""


def get_vocabulary(name: str) -> tuple[str, ...]:
    """Return the named object vocabulary.

    Args:
        name: ``"bnc"`` or ``"disjoint"``.

    Returns:
        The vocabulary's nouns, in file order.

    Raises:
        EntitylensError: If ``name`` is not a known vocabulary.

    """
    try:
        return VOCABULARIES[name]
    except (KeyError, TypeError):
        known = ", ".join(VOCABULARIES)
        raise EntitylensError(f"unknown vocabulary {name!r}; use one of: {known}") from None
