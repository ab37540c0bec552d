"""Build matrices: many checkpoints x precisions x GPU targets, on this machine or a Ray cluster (docs/matrix.md).

    from gemma4_compile.matrix import run_matrix
    result = run_matrix("plan.toml", "out", executor="ray")   # -> out/index.json, out/index.md

Modules: plan (TOML -> Plan -> Jobs with dependency edges), jobs (each kind through the existing stages, and
fingerprints), executors (local, Ray), run (the scheduler), index. Importing this package imports neither
torch nor Ray.
"""

from __future__ import annotations

from .plan import Job, Plan, Resources, expand, load_plan
from .run import MatrixResult, run_matrix

__all__ = ["Job", "MatrixResult", "Plan", "Resources", "expand", "load_plan", "run_matrix"]
