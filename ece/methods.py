"""What distinguishes the editing methods, in one table; everything else they share.

Every method runs through the same stages and library functions (keys, z, covariance, the solve of
ece.update). A method is only a choice of: which layers it writes, whether it restricts the columns
(ECE's attribution) and clusters z (ECE's two steps), how the solve is regularised, and whether it
remembers earlier batches' keys (the cache P). FT-L/FT-M instead fine-tune one W_out (ece.finetune).
"""

from __future__ import annotations

from dataclasses import dataclass

from ece.config import FtCfg, Params, edited_layers


@dataclass(frozen=True)
class Method:
    name: str
    layers: tuple[int, ...]  # the W_out it writes, ascending
    selects_columns: bool  # ECE: only the attributed columns may change
    clusters: bool  # ECE: two-step z from cluster anchors; others: plain z per fact
    needs_z: bool  # closed-form methods; fine-tuning uses the prompts directly
    mom2_weight: float  # λ of λ·C0 in the solve (AlphaEdit: 0, it projects instead)
    use_cache: bool  # P += K Kᵀ after each batch (ECE, AlphaEdit)
    per_fact: bool  # ROME: one rank-one update per fact, in order
    nullspace_threshold: float | None  # AlphaEdit: solve in C0's null space
    l2: float  # AlphaEdit: weight of ‖Δ‖²
    ft: FtCfg | None  # FT-L / FT-M settings
    target_only: bool  # FT-M: loss on the target tokens only


def method_of(p: Params) -> Method:
    name = p.method
    return Method(
        name=name,
        layers=tuple(edited_layers(p)),
        selects_columns=name == "ece",
        clusters=name == "ece",
        needs_z=name not in ("ft-l", "ft-m"),
        mom2_weight={"rome": p.rome.mom2_update_weight, "alphaedit": 0.0}.get(name, p.update.mom2_update_weight),
        use_cache=name in ("ece", "alphaedit"),
        per_fact=name == "rome",
        nullspace_threshold=p.alphaedit.nullspace_threshold if name == "alphaedit" else None,
        l2=p.alphaedit.l2 if name == "alphaedit" else 0.0,
        ft=p.ft if name in ("ft-l", "ft-m") else None,
        target_only=name == "ft-m",
    )


def describe(p: Params) -> str:
    """The update settings of the chosen method, for reports."""
    ft = f"lr {p.ft.lr:g}, {p.ft.steps} steps, L∞ {p.ft.norm_constraint:g}"
    return {
        "ece": f"mom2_update_weight {p.update.mom2_update_weight}",
        "memit": f"mom2_update_weight {p.update.mom2_update_weight}",
        "alphaedit": f"null space of C0 below {p.alphaedit.nullspace_threshold:g}, l2 {p.alphaedit.l2:g}",
        "rome": f"rank one per fact, mom2_update_weight {p.rome.mom2_update_weight:g}",
        "ft-l": f"{ft}, loss on prompt + target",
        "ft-m": f"{ft}, loss on the target only",
    }[p.method]
