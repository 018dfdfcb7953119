"""Where the pipeline keeps its artifacts: paths relative to the project root (where dvc.yaml lives).

Every one of them is declared as a dependency or output in dvc.yaml.
"""

import os
from pathlib import Path

PREPARED = Path("artifacts/prepared/edits.parquet")
COVARIANCE = Path("artifacts/covariance/c0.safetensors")
ATTRIBUTION = Path("artifacts/attribution")
CLUSTERS = Path("artifacts/clusters")
Z_DIR = Path("artifacts/z")
EDITED = Path("artifacts/edited")
EDITOR = Path(
    "artifacts/editor"
)  # a trained editor (MEND; SERAC's scope classifier), or the marker of a method that needs none
# Seconds per batch of each stage: facts of one run, not of its result. They live outside the cached
# outputs (uncached DVC outputs under reports/), so an identical recompute gives identical hashes.
ATTRIBUTION_TIMINGS = Path("reports/attribution_timings.json")
CLUSTER_TIMINGS = Path("reports/cluster_timings.json")
Z_TIMINGS = Path("reports/z_timings.json")
EDITOR_CURVE = Path("reports/editor_curve.json")  # train_editor: train and held-out loss, seconds
EDITOR_PLOT = Path("reports/plots/editor_curve.png")
ROUTING = Path("reports/routing.parquet")  # SERAC: which edit-memory entry answered each evaluated text

# Machine-local scratch, outside DVC: caches keyed by content (z batches, the unedited model's
# evaluation) and the apply_edits checkpoints. ECE_SCRATCH (an absolute path) points several workspaces at
# one folder: DVC's queued experiments run in temporary copies of the repository, and with it what one
# run computed the next one reuses, and a run killed with its session resumes (bench/experiments.py sets it).
SCRATCH = Path(os.environ.get("ECE_SCRATCH") or ".cache")
