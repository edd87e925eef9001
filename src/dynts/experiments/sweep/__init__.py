"""`dynts sweep`: run a policy x budget x window x ratio grid through the evaluation harness.

Layout of a sweep directory::

    SWEEP/sweep.json              the shared flags (model, sampling, samples, ...) and the union of all grids run
    SWEEP/summary.csv             one row per cell and dataset (rewritten after every cell)
    SWEEP/cells/<cell>/           one `dynts eval` run directory per cell: run.json, samples.jsonl,
                                  metrics.json, report.md, and with step tracing steps.jsonl + probe.json

Cells are named `full` (FullKV runs once: it does not depend on the budget) and `<policy>-B<b>-W<w>-r<r>`.

Why it works this way:

* Everything that can be wrong with a grid (unknown policy, W >= B, a ratio that frees nothing, a prompt
  that does not fit a budget, a dynts policy without an importance head, shared flags that differ from the
  ones stored in sweep.json) is found before the first cell runs and before anything is written.
* Resuming: a cell whose metrics.json covers every requested dataset completely (every problem, with the
  requested number of samples) and that holds its step trace (when asked for) is skipped without loading
  the model; a half-finished cell is resumed by run_evals, which skips the samples it already stored.
* The samples of every unfinished cell go through one executor together (one pool of workers with --ray, see
  runtime/ray_executor.py), then the probes; each cell's metrics.json and the summary are written as it completes.
* Rerunning with a different grid into the same SWEEP extends it (sweep.json keeps the union); the flags
  that change per-sample results (model, dtype, sampling, samples, limit, data, head, probe length) must
  match, so every cell of one sweep is comparable.
* Step traces come from a fixed *probe*: after the cells' evaluations, each cell's engine settings decode the
  first problem of the first dataset for a fixed number of tokens, ignoring EOS. The TPS-vs-step and
  KV-vs-step curves then compare policies on one identical workload (same prompt, same length, same batch
  composition at every step), which the evaluation itself cannot give: there, sequences stop at different
  lengths (so `active` and the KV size change for reasons other than the policy) and a resumed cell would
  only trace what was left to do.

Modules: grid.py (syntax, cells, the spec), manifest.py (sweep.json), run.py (checking and running the cells, the
probes), results.py (cells read back, step traces, summary.csv).
"""

from __future__ import annotations

from dynts.config import parse_float_list, parse_int_list, parse_names
from dynts.experiments.sweep.grid import Cell, SweepSpec, cell_dir, format_ratio
from dynts.experiments.sweep.results import (
    SUMMARY_COLUMNS,
    CellResult,
    cell_is_complete,
    load_cells,
    read_csv,
    read_steps,
    summary_rows,
    write_csv,
    write_summary,
)
from dynts.experiments.sweep.run import SweepResult, probe_unit, run_sweep, write_probe

__all__ = [
    "SUMMARY_COLUMNS",
    "Cell",
    "CellResult",
    "SweepResult",
    "SweepSpec",
    "cell_dir",
    "cell_is_complete",
    "format_ratio",
    "load_cells",
    "parse_float_list",
    "parse_int_list",
    "parse_names",
    "probe_unit",
    "read_csv",
    "read_steps",
    "run_sweep",
    "summary_rows",
    "write_csv",
    "write_probe",
    "write_summary",
]
