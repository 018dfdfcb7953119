"""The method registry: what each editing method needs from the pipeline and how it updates.

Every method runs through the same stages and library functions (keys and z of ece.editing, the
covariance, the solves of ece.editing.solve, the sequential ece.editing.editor.Editor). A method is only a
registry entry: which layers it writes, whether it needs z and the covariance statistics, whether it
restricts the columns (ECE's attribution) and clusters z (ECE's two steps), how the solve is
regularised, whether it remembers earlier batches' keys (the cache P), whether it needs an editor
trained beforehand, and whether it answers through an edit memory instead of changed weights (SERAC). The stages, the CLI and the programmatic API read these fields; none branches on a
method's name. Adding a method = its update code under ece/editing/ + one entry in REGISTRY.

This module imports no torch and no other wing, so ece.config can validate `method` against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ece.config import FtCfg, Params, UltraEditCfg


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry: the method's needs (read by the stages) and its update settings."""

    name: str
    summary: str  # one line for help texts and reports
    needs_z: bool  # closed-form methods; fine-tuning uses the prompts directly
    needs_covariance: bool  # λ·C0 in the solve or AlphaEdit's null space
    selects_columns: bool  # ECE: only the attributed columns may change
    clusters: bool  # ECE: z warm-started within groups (z.warm_start)
    use_cache: bool  # P += K Kᵀ after each batch (ECE, AlphaEdit)
    per_fact: bool  # ROME: one rank-one update per fact, in order
    trained_editor: bool  # MEND: an editor trained beforehand (stage train_editor) computes the update
    layer_param: str | None  # a params section whose `layer` is the only layer written (rome, ft)
    settings: Callable[[Params], dict[str, Any]]  # mom2_weight, nullspace_threshold, l2, ft, target_only, ultraedit
    describe: Callable[[Params], str]  # the update settings, for reports
    layers_param: str | None = None  # a params section whose `layers` are the layers written (mend, ultraedit)
    memory: bool = (
        False  # SERAC: writes no weight; answers through an edit memory that evaluation routes prompts through
    )


def _ridge(p: Params) -> dict[str, Any]:
    return {"mom2_weight": p.update.mom2_update_weight}


def _ridge_text(p: Params) -> str:
    return f"mom2_update_weight {p.update.mom2_update_weight}"


def _ft(target_only: bool) -> Callable[[Params], dict[str, Any]]:
    return lambda p: {"mom2_weight": 0.0, "ft": p.ft, "target_only": target_only}


def _ft_text(p: Params, loss: str) -> str:
    return f"lr {p.ft.lr:g}, {p.ft.steps} steps, L∞ {p.ft.norm_constraint:g}, loss on {loss}"


_CLOSED_FORM = dict(needs_z=True, needs_covariance=True, per_fact=False, trained_editor=False, layer_param=None)
# Methods that write from gradients of the edit prompts: no z, no C0, no column selection, no cache P.
_GRADIENT = dict(
    needs_z=False, needs_covariance=False, selects_columns=False, clusters=False, use_cache=False, per_fact=False
)
_FINETUNE = dict(**_GRADIENT, trained_editor=False, layer_param="ft")

REGISTRY: dict[str, MethodSpec] = {
    s.name: s
    for s in [
        MethodSpec(
            "ece",
            "attributed columns, clustered z, cache of earlier batches",
            selects_columns=True,
            clusters=True,
            use_cache=True,
            settings=_ridge,
            describe=_ridge_text,
            **_CLOSED_FORM,
        ),
        MethodSpec(
            "memit",
            "every column of every edited layer, plain z per fact",
            selects_columns=False,
            clusters=False,
            use_cache=False,
            settings=_ridge,
            describe=_ridge_text,
            **_CLOSED_FORM,
        ),
        MethodSpec(
            "alphaedit",
            "MEMIT's update projected on C0's null space, cache of earlier batches",
            selects_columns=False,
            clusters=False,
            use_cache=True,
            settings=lambda p: {
                "mom2_weight": 0.0,
                "nullspace_threshold": p.alphaedit.nullspace_threshold,
                "nullspace_energy": p.alphaedit.nullspace_energy,
                "l2": p.alphaedit.l2,
            },
            describe=lambda p: (
                (
                    f"null space of C0 holding {p.alphaedit.nullspace_energy:g} of its energy"
                    if p.alphaedit.nullspace_energy
                    else f"null space of C0 below {p.alphaedit.nullspace_threshold:g}"
                )
                + f", l2 {p.alphaedit.l2:g}"
            ),
            **_CLOSED_FORM,
        ),
        MethodSpec(
            "rome",
            "one rank-one update per fact on one layer",
            needs_z=True,
            needs_covariance=True,
            selects_columns=False,
            clusters=False,
            use_cache=False,
            per_fact=True,
            trained_editor=False,
            layer_param="rome",
            settings=lambda p: {"mom2_weight": p.rome.mom2_update_weight},
            describe=lambda p: f"rank one per fact, mom2_update_weight {p.rome.mom2_update_weight:g}",
        ),
        MethodSpec(
            "ft-l",
            "constrained fine-tuning of one W_out",
            settings=_ft(False),
            describe=lambda p: _ft_text(p, "prompt + target"),
            **_FINETUNE,
        ),
        MethodSpec(
            "ft-m",
            "constrained fine-tuning of one W_out, loss masked to the target",
            settings=_ft(True),
            describe=lambda p: _ft_text(p, "the target only"),
            **_FINETUNE,
        ),
        MethodSpec(
            "ultraedit",
            "one forward/backward per batch, lifelong-normalised features, ridge solve on its own late layers",
            **_GRADIENT,
            trained_editor=False,
            layer_param=None,
            layers_param="ultraedit",
            settings=lambda p: {"mom2_weight": 0.0, "ultraedit": p.ultraedit},
            describe=lambda p: f"lr {p.ultraedit.lr:g}, ridge 1, lifelong normalisation",
        ),
        MethodSpec(
            "mend",
            "a trained editor network transforms the edit prompt's gradient of W_out (last blocks)",
            **_GRADIENT,
            trained_editor=True,
            layer_param=None,
            layers_param="mend",
            settings=lambda p: {"mom2_weight": 0.0},
            describe=lambda p: f"MEND editor on layers {list(p.mend.layers)}, rank {p.mend.rank}",
        ),
        MethodSpec(
            "serac",
            "an edit memory, a trained scope classifier, the base model with the retrieved edit in its context",
            **_GRADIENT,
            trained_editor=True,
            layer_param=None,
            memory=True,
            settings=lambda p: {"mom2_weight": 0.0},
            describe=lambda p: (
                f"scope classifier on layer {p.serac.embed_layer} (dim {p.serac.dim}), threshold {p.serac.threshold:g}"
            ),
        ),
    ]
}


@dataclass(frozen=True)
class Method:
    """A registry entry resolved against one params file: what the Editor and the stages run."""

    name: str
    layers: tuple[int, ...]  # the W_out it writes, ascending
    selects_columns: bool
    clusters: bool
    needs_z: bool
    needs_covariance: bool
    trained_editor: bool
    memory: bool
    mom2_weight: float  # λ of λ·C0 in the solve (AlphaEdit: 0, it projects instead)
    use_cache: bool
    per_fact: bool
    nullspace_threshold: float | None = None  # AlphaEdit: solve in C0's null space
    nullspace_energy: float = 0.0  # AlphaEdit: > 0, that null space by energy share instead (nullspace_basis)
    l2: float = 0.0  # AlphaEdit: weight of ‖Δ‖²
    ft: FtCfg | None = None  # FT-L / FT-M settings
    target_only: bool = False  # FT-M: loss on the target tokens only
    ultraedit: UltraEditCfg | None = None  # UltraEdit: gradient features, lifelong moments, ridge solve


def edited_layers(p: Params) -> list[int]:
    """The layers the chosen method writes: none for a method that answers through a memory, its
    `layers_param` section's layers, its `layer_param` section's layer, or edit.layers."""
    spec = REGISTRY[p.method]
    if spec.memory:
        return []
    if spec.layers_param:
        return list(getattr(p, spec.layers_param).layers)
    return [getattr(p, spec.layer_param).layer] if spec.layer_param else list(p.edit.layers)


def method_of(p: Params) -> Method:
    spec = REGISTRY[p.method]
    return Method(
        name=spec.name,
        layers=tuple(edited_layers(p)),
        selects_columns=spec.selects_columns,
        clusters=spec.clusters,
        needs_z=spec.needs_z,
        needs_covariance=spec.needs_covariance,
        trained_editor=spec.trained_editor,
        memory=spec.memory,
        use_cache=spec.use_cache,
        per_fact=spec.per_fact,
        **spec.settings(p),
    )


def describe(p: Params) -> str:
    """The update settings of the chosen method, for reports."""
    return REGISTRY[p.method].describe(p)
