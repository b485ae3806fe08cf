"""Pipelines: whole jobs built from the analyses below them, one frozen config each.

* :mod:`~entitylens.pipelines.experiment` -- KST24's comparisons (``entitylens experiment``), with
  :mod:`~entitylens.pipelines.paper_table` (our numbers beside the paper's);
* :mod:`~entitylens.pipelines.probe_study` / :mod:`~entitylens.pipelines.patch_study` -- a (base, variant)
  pair probed or patched side by side (``entitylens study``), on :mod:`~entitylens.pipelines.study`;
* :mod:`~entitylens.pipelines.demo` and :mod:`~entitylens.pipelines.demo_report` -- ``entitylens demo``;
* :mod:`~entitylens.pipelines.estimate` -- the one GPU-time estimate.

Floor 6 of the house (docs/design.md): it imports every analysis; only the CLI imports it.
"""
