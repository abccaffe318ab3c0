"""Where a scenario and a calibration meet: the cost model one scenario runs with.

A scenario only stores the name of its `calibration:` file; the calibration module knows nothing of
scenarios. This function joins the two, so neither imports the other."""
from __future__ import annotations

from spdsim.calibration_file import load_calibration
from spdsim.costs import CostModel, RooflineCosts


def cost_model(scenario) -> CostModel:
    """A `spdsim calibrate` file replaces the roofline when the scenario names one."""
    if scenario.calibration:
        return load_calibration(scenario.calibration_path(),
                                head_kind="head" if scenario.head.features else "oracle")
    return RooflineCosts(scenario.model, scenario.hardware.gpu, scenario.hardware.graph, scenario.costs,
                         head_layers=scenario.head.layers)
