"""Linear probes over all layers at once, their metrics, splits and controls."""

from entitylens.probing.controls import ControlsResult, control_labels, metric_difference, run_controls
from entitylens.probing.io import load_probe_result, save_probe_result
from entitylens.probing.linear import ProbeConfig, ProbeResult, fit_probes
from entitylens.probing.metrics import StratifiedAccuracy, stratified_accuracy
from entitylens.probing.outputs import compare_probe_runs, read_probe_table, write_probe_outputs
from entitylens.probing.rows import PROBE_COLUMNS
from entitylens.probing.run import ProbeRun, ProbeRunConfig, reinitialize_weights, run_probes
from entitylens.probing.splits import Split, group_codes, group_folds, split_by_group
from entitylens.probing.targets import TARGETS, ProbeTarget, build_target

__all__ = [
    "ControlsResult",
    "ProbeConfig",
    "ProbeResult",
    "Split",
    "StratifiedAccuracy",
    "control_labels",
    "fit_probes",
    "group_codes",
    "group_folds",
    "load_probe_result",
    "metric_difference",
    "run_controls",
    "save_probe_result",
    "split_by_group",
    "stratified_accuracy",
    # From a cache: targets, runs, outputs
    "PROBE_COLUMNS",
    "TARGETS",
    "ProbeRun",
    "ProbeRunConfig",
    "ProbeTarget",
    "build_target",
    "compare_probe_runs",
    "read_probe_table",
    "reinitialize_weights",
    "run_probes",
    "write_probe_outputs",
]
