"""SWEEP/sweep.json: the shared flags a rerun must keep, and the union of every grid run into the directory."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from dynts.errors import DynTSError
from dynts.experiments.sweep.grid import CELLS_DIR, Cell, SweepSpec
from dynts.harness.store import (
    manifest_differences,
    write_json_atomic,
)

SWEEP_FILE = "sweep.json"


SWEEP_FORMAT = 1


# Shared flags whose change would make cells of one sweep incomparable: a rerun must match them.
STRICT_FIELDS = ("model", "dtype", "sampling", "samples", "limit", "data_dir", "split", "shuffle_seed", "head")


# The probe's shape must match too, once both runs traced steps (tracing itself may be switched on or off).
PROBE_FIELDS = ("probe_tokens", "probe_batch")


def read_sweep_file(sweep_dir: str | Path) -> dict | None:
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DynTSError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("shared"), dict):
        raise DynTSError(f"{path} is not a dynts sweep file")
    return data


def shared_differences(stored: dict, new: dict) -> list[str]:
    """The shared flags a rerun must keep (a field missing from an older sweep.json counts as null); the probe's
    shape only once both runs traced steps."""
    out = manifest_differences(
        {k: stored.get(k) for k in STRICT_FIELDS}, {k: new.get(k) for k in STRICT_FIELDS}, STRICT_FIELDS
    )
    probes = [k for k in PROBE_FIELDS if stored.get(k) is not None and new.get(k) is not None]
    return out + [
        f"{difference} (step traces of one sweep must be comparable)"
        for difference in manifest_differences(stored, new, probes)
    ]


def _check_sweep_file(out: Path, stored: dict | None, shared: dict) -> None:
    if stored is None:
        if (out / CELLS_DIR).exists():
            raise DynTSError(f"{out} holds cells but no {SWEEP_FILE}; use a new --out directory")
        return
    differences = shared_differences(stored["shared"], shared)
    if differences:
        raise DynTSError(
            f"{out / SWEEP_FILE} was written with different shared flags ({'; '.join(differences)}). "
            "A rerun into the same sweep may change the grid (policies, budgets, windows, ratios, datasets) "
            "but not these; use the same flags or a new --out directory."
        )


def _write_sweep_file(out: Path, stored: dict | None, spec: SweepSpec, shared: dict, cells: list[Cell]) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    union = dict(stored["grid"]) if stored else {}
    for key, values in spec.grid().items():
        merged = list(dict.fromkeys([*union.get(key, []), *values]))
        union[key] = sorted(merged) if key in ("budgets", "windows", "ratios") else merged
    data = {
        "format": SWEEP_FORMAT,
        "shared": {
            **(stored["shared"] if stored else {}),
            **{k: v for k, v in shared.items() if v is not None or k not in PROBE_FIELDS},
        },
        "grid": union,
        "cells": list(dict.fromkeys([*(stored.get("cells", []) if stored else []), *(c.name for c in cells)])),
        "runs": [
            *(stored.get("runs", []) if stored else []),
            {"at": now, "grid": spec.grid(), "skipped": list(spec.skipped)},
        ],
        "created_at": stored.get("created_at", now) if stored else now,
        "updated_at": now,
    }
    write_json_atomic(out / SWEEP_FILE, data)
