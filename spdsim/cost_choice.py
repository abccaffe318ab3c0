"""Where a scenario and a calibration meet: the cost model one scenario runs with.

A scenario only stores the name of its `calibration:` file; the calibration module knows nothing of
scenarios. This function joins the two, so neither imports the other."""
from __future__ import annotations

from dataclasses import replace

from spdsim.calibration_file import load_calibration
from spdsim.costs import CostModel, RooflineCosts
from spdsim.gpu_calibration import is_gpu_calibration, load_gpu_calibration


def cost_model(scenario) -> CostModel:
    """A `spdsim calibrate` file replaces the roofline when the scenario names one (with the scenario's
    model shape: a TP point's message sizes); a GPU's fitted roofline (`kind: gpu-roofline`,
    benchmarks/gpu_check.py) is the roofline with that GPU's parameters."""
    if scenario.calibration:
        path = scenario.calibration_path()
        if is_gpu_calibration(path):
            return load_gpu_calibration(path).cost_model(scenario.model, scenario.hardware, scenario.costs,
                                                         scenario.head.layers, f"calibration {scenario.calibration}")
        return replace(load_calibration(path, head_kind="head" if scenario.head.features else "oracle"),
                       model=scenario.model)
    return RooflineCosts(scenario.model, scenario.hardware.gpu, scenario.hardware.graph, scenario.costs,
                         head_layers=scenario.head.layers)
