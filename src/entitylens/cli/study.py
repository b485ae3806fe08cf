"""``entitylens study probe|patch``: probing or patching on a (base, variant) model pair, side by side.

The flags come from :class:`~entitylens.pipelines.probe_study.ProbeStudyConfig` and
:class:`~entitylens.pipelines.patch_study.PatchStudyConfig`. Examples::

    entitylens study probe --device cuda --dtype bfloat16 --yes               # llama2-7b vs codellama-7b
    entitylens study probe --base testbed:base --variant testbed:code --states 240 --random-control
    entitylens study patch --base testbed:base --variant testbed:code --attribution
"""

from __future__ import annotations

import argparse
from pathlib import Path

from entitylens.cli._args import add_config_args, config_from_args, read_prefix


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``study probe`` and ``study patch``."""
    from entitylens.pipelines.patch_study import PatchStudyConfig
    from entitylens.pipelines.probe_study import ProbeStudyConfig
    from entitylens.pipelines.study import default_model_pair

    p = sub.add_parser("study", help="probe or patch a (base, variant) model pair, side by side")
    ssub = p.add_subparsers(dest="study", metavar="STUDY")
    ssub.required = True
    base, variant = default_model_pair()
    for name, cls, what in (
        ("probe", ProbeStudyConfig, "linear probes by layer on both models' residual streams"),
        ("patch", PatchStudyConfig, "activation patching grids of both models on the same pairs"),
    ):
        s = ssub.add_parser(name, help=what, description=f"{what[0].upper()}{what[1:]}, compared on one scale.")
        # device/dtype None: chosen at run time (cuda + bfloat16 when a GPU is visible, else cpu + float32)
        defaults = {"base": base, "variant": variant, "out": Path(f"runs/{name}_base_vs_code"), "device": None,
                    "dtype": None}  # fmt: skip
        add_config_args(s, cls, skip=("prefix",), defaults=defaults)
        prefix = s.add_mutually_exclusive_group()
        prefix.add_argument("--kst24-prefix", action="store_true",
                            help="put KST24's instruction and two demonstrations before every ks prompt")
        prefix.add_argument("--prefix-file", type=Path, default=None, help="text file put before every ks prompt")
        s.add_argument("--yes", action="store_true", help="do not ask before a large run (the estimate is printed)")
        s.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        s.set_defaults(func=run_study_cmd, config_class=cls)


def _device_defaults(args: argparse.Namespace) -> None:
    """``--device`` / ``--dtype`` not given: cuda and bfloat16 when a GPU is visible, else cpu and float32."""
    if args.device is None or args.dtype is None:
        gpu = _cuda_available()
        args.device = args.device or ("cuda" if gpu else "cpu")
        args.dtype = args.dtype or ("bfloat16" if gpu else "float32")


def run_study_cmd(args: argparse.Namespace) -> int:
    """Run ``entitylens study probe|patch``."""
    from entitylens.pipelines.estimate import ask_to_proceed
    from entitylens.pipelines.patch_study import run_patch_study
    from entitylens.pipelines.probe_study import run_probe_study

    _device_defaults(args)
    config = config_from_args(args.config_class, args, prefix=read_prefix(args))
    run = run_probe_study if args.study == "probe" else run_patch_study
    run(config, confirm=None if args.yes else ask_to_proceed)
    return 0
