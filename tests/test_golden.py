"""The restructured code gives the same answers: calibration file, calibrate's printed fits and
in-sample check, and a calibrated sweep's predictions are byte-identical to what the code wrote before
the restructuring, on the same traces (tests/data/golden: a short `executor profile --stages 2` of the
tiny model, AR / PP / SPD oracle 0.5 / SPD with the trained module). A change that moves any figure
must regenerate the files on purpose (see tests/data/golden/README.md) and say why."""
from __future__ import annotations

import shutil
from pathlib import Path

from spdsim.calibrate import calibrate
from spdsim.calibration_file import write_calibration
from spdsim.replay import in_sample
from spdsim.scenario import load_scenario
from spdsim.sweep import run_sweep

GOLDEN = Path(__file__).parent / "data" / "golden"


def _calibrated(tmp_path: Path) -> tuple[Path, list[str]]:
    costs, err, lines = calibrate(GOLDEN / "traces")
    out = write_calibration(tmp_path / "calibration.yaml", costs, err)
    return out, lines + in_sample(GOLDEN / "traces", out)


def _without_trace_dir(path: Path) -> bytes:
    """The file's bytes less its `trace_dir:` line (where the traces lay when it was written)."""
    return b"".join(l for l in path.read_bytes().splitlines(keepends=True) if not l.strip().startswith(b"trace_dir:"))


def test_calibration_file_and_report_unchanged(tmp_path):
    out, lines = _calibrated(tmp_path)
    assert _without_trace_dir(out) == _without_trace_dir(GOLDEN / "calibration.yaml")
    expected = [l for l in (GOLDEN / "calibrate.stdout").read_text().splitlines() if not l.startswith("wrote ")]
    assert lines == expected


def test_calibrated_predictions_unchanged(tmp_path):
    _calibrated(tmp_path)
    for scen, csv in (("scenario.yaml", "results.csv"), ("scenario_head.yaml", "results_head.csv")):
        shutil.copy(GOLDEN / scen, tmp_path / scen)
        df = run_sweep(load_scenario(tmp_path / scen))
        got = tmp_path / csv
        df.to_csv(got, index=False)
        assert got.read_text() == (GOLDEN / csv).read_text(), csv
