"""Typed view of params.yaml.

OmegaConf merges the file onto dataclass defaults, which rejects unknown keys and values of the wrong
type; the checks that types cannot express (choices, ranges) live in `validate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ece.errors import EceError
from ece.methods import REGISTRY

SCORERS = ("as", "wi", "wi_static", "rs")  # ece.scorer; ece.editing.attribution implements each
AGGREGATIONS = ("sum", "union")  # ece.aggregation
METHODS = tuple(REGISTRY)
GENERAL_TASKS = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")
DTYPES = ("float32", "bfloat16", "float16")  # model.dtype
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"  # runtime.device
FORMATS = ("auto", "counterfact", "counterfact_compact", "zsre", "jsonl", "csv")


@dataclass
class ModelCfg:
    name: str = "smollm2-135m"
    seed: int = 0
    dtype: str = "float32"  # the model's weights and activations; keys, z, C0 and solves stay float32/float64
    device_map: str = "none"  # none: the whole model on runtime.device | auto: spread by accelerate over GPUs (+ CPU)


@dataclass
class RuntimeCfg:
    """Where the work runs. Not a DVC param of any stage: the same computation on other hardware gives the
    same results up to float summation order, so changing it reruns nothing."""

    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N


@dataclass
class EditCfg:
    layers: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7])
    batch_size: int = 25


@dataclass
class DataCfg:
    edit_dataset: str = MISSING
    format: str = "auto"
    generation_prompts: str | None = None
    n_facts: int = 0
    max_chars: int = 2000


@dataclass
class CovarianceCfg:
    corpus: str = MISSING
    n_tokens: int = 100_000
    seq_len: int = 128
    batch_size: int = 64  # chunks per forward: larger matrix products, 2-3x the tokens/s of 8 on 2 cores


@dataclass
class EceCfg:
    scorer: str = "wi"
    neuron_threshold: float = 0.8
    aggregation: str = "sum"


@dataclass
class ClusterCfg:
    k: Any = "auto"
    k_max: int = 8
    seed: int = 0


@dataclass
class ZCfg:
    shared_steps: int = 20
    instance_steps: int = 5
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    n_context: int = 5
    context_length: int = 10
    stop_loss: float = 5e-2  # stop a fact when its total loss is below this (MEMIT); 0 = off
    stop_nll: float = 0.0  # stop a fact when its mean target NLL is below this; 0 = off
    lr_scale: str = "none"  # none: lr per coordinate | norm: lr·‖h‖/√d per coordinate
    carry_adam: bool = True  # members start from the anchor's Adam moments (False: fresh moments)
    warm_start: str = "cluster"  # what a member starts from: cluster (its neuron cluster's anchor),
    # object (the first fact of the batch with the same target_new), cluster_object (both), none
    warm_from_earlier: str = "none"  # facts whose target_new an earlier batch edited start from the mean
    # final δ of those earlier facts (ECE only; every batch's z is on the original model): none | anchors (a
    # group's anchor does; its members wait for it) | all (every such fact, at once, in its own group)
    warm_scale: float = 1.0  # a warm start begins at this × the δ it borrows (a member's from its anchor, an
    # anchor's from earlier facts with its object): below 1 it ends nearer the smallest δ that meets the stop rule
    predict_cold: float = 0.0  # > 0: with warm_from_earlier, an anchor whose target_new no earlier fact had
    # starts from this × a ridge prediction of its δ from the object's first-token input embedding, fitted
    # on every earlier fact's final δ (0: from zero, as MEMIT)
    predict_calibrate: bool = False  # True: that prediction is also scaled by the least-squares scale of the
    # fit's predictions onto the δ of later facts with new objects (no prediction until one batch measured it)
    predict_center: bool = False  # True: that prediction without its component along the fitted facts' mean
    # δ (the direction every fact's δ shares, which predicted starts leave in the final δ: reports/predict_cost.md)
    predict_ridge: float = 1.0  # the ridge penalty of that fit (on unit-normed embeddings)
    predict_min_facts: int = 100  # earlier facts the fit needs before it predicts (fewer: cold starts from zero)
    facts_per_pass: int = 0  # 0: a pass runs all its facts in one forward/backward; N: N at a time (same
    # descent, less memory; the references run 1)
    window_batches: int = 1  # edit batches whose z is computed in one loop (the facts of a window are one z
    # batch: fuller passes, and warm starts within it); the update still runs batch by batch
    dtype: str = "model"  # z's forward/backward passes: model (the model's dtype) | bfloat16 | float32


@dataclass
class UpdateCfg:
    mom2_update_weight: float = 15000.0
    max_update_norm: float = 10000.0  # stop before saving when one layer's ‖Δ‖ exceeds this


@dataclass
class AlphaEditCfg:
    nullspace_threshold: float = 2e-2  # eigenvalues of C0 below this span the protected null space
    # > 0: the null space is instead C0's smallest-eigenvalue directions holding at most this share of tr(C0)
    # (scale-free; the absolute threshold leaves 29-60 % of SmolLM2's key energy "null", reports/update_energy.md)
    nullspace_energy: float = 0.0
    l2: float = 10.0  # weight of ‖Δ‖² in the projected solve


@dataclass
class RomeCfg:
    layer: int = 5
    mom2_update_weight: float = 1.0  # λ → 0 is ROME's exact constraint Δk = r


@dataclass
class FtCfg:
    layer: int = 5
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float = 5e-4  # L∞ bound on W − W_original, entrywise


@dataclass
class UltraEditCfg:
    layers: list[int] = field(default_factory=lambda: [20, 21, 22, 23, 24, 25, 26])  # reports/ultraedit_check.md
    lr: float = 3e-4  # step of the pseudo values V = -lr·‖k̂‖²·ĝ (reference 1e-6 for 7B; reports/ultraedit_check.md)


@dataclass
class TrainEditorCfg:
    """Stage train_editor: the records an editor (MEND) learns from, never the facts being edited."""

    data: str = "data/counterfact/counterfact_compact_0-19999.json"
    format: str = "auto"
    id_range: list[int] = field(default_factory=lambda: [10000, 19999])  # first and last id number, inclusive
    heldout: int = 100  # the last N selected records: held-out loss for the curve and early stopping
    max_steps: int = 2000  # training edits (one record each)
    eval_every: int = 100  # held-out loss and a resumable checkpoint every N steps
    patience: int = 5  # stop after N evaluations without a better held-out loss (0: never early)
    seed: int = 0


@dataclass
class MendCfg:
    """MEND (Mitchell et al., ICLR 2022): the editor network and its training."""

    layers: list[int] = field(default_factory=lambda: [27, 28, 29])
    rank: int = 1920
    edit_lr: float = 1e-4
    lr: float = 1e-6
    lr_lr: float = 1e-4
    c_edit: float = 0.1
    c_loc: float = 1.0
    accumulate: int = 10
    grad_clip: float = 100.0


@dataclass
class SeracCfg:
    """SERAC (Mitchell et al., ICML 2022): the scope classifier (trained by train_editor) and the routing
    threshold (used by apply_edits, stored with the edit memory)."""

    embed_layer: int = 15  # block whose output, mean-pooled, embeds a text (the base model is frozen)
    dim: int = 256  # width of the trained projection
    temperature: float = 0.1  # initial τ of cos/τ + b (τ and b are trained)
    lr: float = 1e-3  # Adam step of the projection
    batch_records: int = 32  # training records per step (their statements × all their queries)
    general_texts: int = 1000  # windows of covariance.corpus embedded once as general-text negatives
    general_words: list[int] = field(default_factory=lambda: [8, 96])  # a window's length in words: [min, max]
    general_negatives: int = 64  # general texts per step, each a negative of every statement of the step
    threshold: float = 0.95  # a query is in scope of its best memory entry when the probability exceeds this


@dataclass
class EvaluateCfg:
    batch_size: int = 16  # prompts per forward pass (scoring, general ability, perplexity)
    gen_batch_size: int = 128  # prompts sampled together (the texts do not depend on it)
    n_general: int = 20  # first N examples of each general-ability task (0 = all)
    general_tasks: list[str] = field(default_factory=lambda: ["sst2", "mrpc", "cola", "rte", "nli", "mmlu"])
    general_dir: str = "data/general"
    ppl_corpus: str = "data/corpus/wikitext2_raw_test.txt"
    ppl_tokens: int = 4096
    ppl_window: int = 512
    gen_per_fact: int = 1  # first N generation prompts of each fact (0 = no fluency/consistency)
    gen_facts: int = 300  # fluency/consistency on this many facts spread evenly over the facts (0 = all)
    gen_max_new_tokens: int = 40
    gen_top_k: int = 5
    seed: int = 0
    threads: int = 1  # torch intra-op threads for the stage (0 = torch's default, one per core)
    curve_every: int = 0  # > 0: rewrite metrics of all facts after every N-th batch
    reference_corpus: str = "data/corpus/wikipedia_vital_summaries_en.jsonl"
    reference_articles: int = 5
    attribute_snippets: str | None = None
    idf: str | None = None
    tfidf_vocab: str | None = None


@dataclass
class Params:
    method: str = "ece"
    model: ModelCfg = field(default_factory=ModelCfg)
    runtime: RuntimeCfg = field(default_factory=RuntimeCfg)
    edit: EditCfg = field(default_factory=EditCfg)
    data: DataCfg = field(default_factory=DataCfg)
    covariance: CovarianceCfg = field(default_factory=CovarianceCfg)
    ece: EceCfg = field(default_factory=EceCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    z: ZCfg = field(default_factory=ZCfg)
    update: UpdateCfg = field(default_factory=UpdateCfg)
    alphaedit: AlphaEditCfg = field(default_factory=AlphaEditCfg)
    rome: RomeCfg = field(default_factory=RomeCfg)
    ft: FtCfg = field(default_factory=FtCfg)
    ultraedit: UltraEditCfg = field(default_factory=UltraEditCfg)
    train_editor: TrainEditorCfg = field(default_factory=TrainEditorCfg)
    mend: MendCfg = field(default_factory=MendCfg)
    serac: SeracCfg = field(default_factory=SeracCfg)
    evaluate: EvaluateCfg = field(default_factory=EvaluateCfg)


LR_SCALES = ("none", "norm")  # z.lr_scale
WARM_STARTS = ("cluster", "object", "cluster_object", "none")  # z.warm_start
WARM_FROM_EARLIER = ("none", "anchors", "all")  # z.warm_from_earlier
MAX_CONTEXT = 10  # z.n_context: one prefix per starter word of ece.keys (not imported: prepare would depend on it)

# Every numeric param and its lower bound: (name, bound, whether the bound itself is allowed, hint).
# Upper bounds (ece.neuron_threshold, z.n_context) are checked on their own in `validate`.
_LOWER_BOUNDS: tuple[tuple[str, float, bool, str], ...] = (
    ("model.seed", 0, True, "any integer >= 0, e.g. 0"),
    ("edit.batch_size", 1, True, "e.g. 25"),
    ("data.n_facts", 0, True, "0 means every record"),
    ("data.max_chars", 1, True, "e.g. 2000"),
    ("covariance.n_tokens", 1, True, "e.g. 100000"),
    ("covariance.seq_len", 2, True, "e.g. 128 (tokens per corpus window)"),
    ("covariance.batch_size", 1, True, "e.g. 8"),
    ("cluster.k_max", 1, True, "e.g. 8"),
    ("cluster.seed", 0, True, "any integer >= 0, e.g. 0"),
    ("z.shared_steps", 0, True, "paper: 20; 0 skips the shared descent"),
    ("z.instance_steps", 0, True, "paper: 5; 0 skips the per-fact descent"),
    ("z.lr", 0, False, "MEMIT: 0.5"),
    ("z.kl_factor", 0, True, "MEMIT: 0.0625; 0 drops the KL term"),
    ("z.weight_decay", 0, True, "MEMIT: 0.5; 0 drops the weight decay"),
    ("z.clamp_norm_factor", 0, False, "e.g. 0.75 (‖δ‖ <= factor·‖h‖)"),
    ("z.n_context", 0, True, "MEMIT: 5; 0 uses the bare prompt only"),
    ("z.context_length", 1, True, "MEMIT: 10 (tokens per generated prefix)"),
    ("z.stop_loss", 0, True, "0 turns the early stop off; MEMIT: 5e-2"),
    ("z.stop_nll", 0, True, "0 turns the early stop off"),
    ("z.facts_per_pass", 0, True, "0 descends on the whole batch at once"),
    ("z.window_batches", 1, True, "1 computes z batch by batch"),
    ("z.warm_scale", 0, True, "1 starts from the borrowed δ as it is; 0 from zero"),
    ("z.predict_cold", 0, True, "0 starts new objects from zero; e.g. 2"),
    ("z.predict_ridge", 0, False, "e.g. 1"),
    ("z.predict_min_facts", 1, True, "e.g. 100"),
    ("update.mom2_update_weight", 0, True, "e.g. 15000"),
    ("update.max_update_norm", 0, False, "e.g. 10000 (a safety stop far above the norms of healthy updates)"),
    ("alphaedit.nullspace_threshold", 0, False, "AlphaEdit: 2e-2"),
    ("alphaedit.l2", 0, False, "AlphaEdit: 10"),
    ("rome.layer", 0, True, "one of edit.layers, e.g. 5"),
    ("rome.mom2_update_weight", 0, False, "e.g. 1 (≈ ROME's exact constraint)"),
    ("ft.layer", 0, True, "one of edit.layers, e.g. 5"),
    ("ft.lr", 0, False, "ROME's FT-L: 5e-4"),
    ("ft.steps", 1, True, "ROME's FT-L: 25"),
    ("ft.norm_constraint", 0, False, "ROME's FT-L: 5e-4"),
    ("ultraedit.lr", 0, False, "UltraEdit's released config: 1e-6"),
    ("train_editor.heldout", 1, True, "e.g. 100 (held out for early stopping)"),
    ("train_editor.max_steps", 1, True, "e.g. 2000"),
    ("train_editor.eval_every", 1, True, "e.g. 100"),
    ("train_editor.patience", 0, True, "0 never stops early"),
    ("train_editor.seed", 0, True, "any integer >= 0, e.g. 0"),
    ("mend.rank", 1, True, "MEND: 1920"),
    ("mend.edit_lr", 0, False, "MEND: 1e-4"),
    ("mend.lr", 0, False, "MEND: 1e-6"),
    ("mend.lr_lr", 0, True, "MEND: 1e-4; 0 keeps the per-layer edit step sizes fixed"),
    ("mend.c_edit", 0, False, "MEND: 0.1"),
    ("mend.c_loc", 0, True, "MEND: 1.0"),
    ("mend.accumulate", 1, True, "MEND: 10"),
    ("mend.grad_clip", 0, False, "MEND: 100"),
    ("serac.embed_layer", 0, True, "e.g. 15 (a middle block of SmolLM2's 30)"),
    ("serac.dim", 1, True, "e.g. 256"),
    ("serac.temperature", 0, False, "e.g. 0.1"),
    ("serac.lr", 0, False, "e.g. 1e-3"),
    ("serac.batch_records", 2, True, "e.g. 32 (the other records of a step are its negatives)"),
    ("serac.general_texts", 0, True, "e.g. 1000 (0: no general-text negatives)"),
    ("serac.general_negatives", 0, True, "e.g. 64 (0: no general-text negatives)"),
    ("evaluate.batch_size", 1, True, "e.g. 16"),
    ("evaluate.n_general", 0, True, "0 means every example"),
    ("evaluate.ppl_tokens", 1, True, "e.g. 4096"),
    ("evaluate.ppl_window", 1, True, "e.g. 512"),
    ("evaluate.gen_per_fact", 0, True, "0 skips fluency and consistency"),
    ("evaluate.gen_facts", 0, True, "0 means every fact; MEMIT samples for all"),
    ("evaluate.gen_max_new_tokens", 1, True, "e.g. 40"),
    ("evaluate.gen_batch_size", 1, True, "e.g. 128"),
    ("evaluate.gen_top_k", 1, True, "MEMIT: 5"),
    ("evaluate.seed", 0, True, "any integer >= 0, e.g. 0"),
    ("evaluate.threads", 0, True, "0 means torch's default (one per core)"),
    ("evaluate.curve_every", 0, True, "0 turns the curve off"),
    ("evaluate.reference_articles", 1, True, "e.g. 5"),
)


def _check(cond: bool, message: str, hint: str) -> None:
    if not cond:
        raise EceError(message, hint)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"unknown {name} '{value}'", f"use one of {', '.join(choices)}")


def _check_layers(name: str, layers: list[int], lowest: int) -> None:
    _check(len(layers) > 0, f"{name} is empty", "name at least one layer, e.g. [3, 4, 5, 6, 7]")
    _check(
        min(layers) >= lowest,
        f"{name} must be >= {lowest}, got {layers}",
        "layers count from 0" + ("; MEND reads the activations below its first layer" if lowest else ""),
    )
    _check(
        layers == sorted(set(layers)),
        f"{name} must be strictly ascending without repeats, got {layers}",
        "write them in ascending order",
    )


def validate(p: Params) -> None:
    """Reject values that type checking cannot catch: unknown choices and numbers out of range.

    Each is caught here, when params.yaml is read, with a message naming the param, instead of as a
    NaN, an empty selection or a stack trace in the middle of a stage.
    """
    _choice("method", p.method, METHODS)
    _choice("ece.scorer", p.ece.scorer, SCORERS)
    _choice("ece.aggregation", p.ece.aggregation, AGGREGATIONS)
    _choice("data.format", p.data.format, FORMATS)
    _choice("model.dtype", p.model.dtype, DTYPES)
    _choice("model.device_map", p.model.device_map, ("none", "auto"))
    _check(
        re.fullmatch(DEVICE_PATTERN, p.runtime.device) is not None,
        f"unknown runtime.device '{p.runtime.device}'",
        "use auto, cpu, cuda or cuda:N",
    )
    _choice("z.lr_scale", p.z.lr_scale, LR_SCALES)
    _choice("z.warm_start", p.z.warm_start, WARM_STARTS)
    _choice("z.warm_from_earlier", p.z.warm_from_earlier, WARM_FROM_EARLIER)
    _choice("z.dtype", p.z.dtype, ("model", *DTYPES))
    for name, bound, inclusive, hint in _LOWER_BOUNDS:
        section, key = name.split(".")
        value = getattr(getattr(p, section), key)
        _check(
            value >= bound if inclusive else value > bound,
            f"{name} must be {'>=' if inclusive else '>'} {bound:g}, got {value}",
            hint,
        )
    _check(
        0.0 < p.ece.neuron_threshold <= 1.0,
        f"ece.neuron_threshold must be in (0, 1], got {p.ece.neuron_threshold}",
        "0.8 is the paper's value",
    )
    _check(p.z.n_context <= MAX_CONTEXT, f"z.n_context must be <= {MAX_CONTEXT}, got {p.z.n_context}", "MEMIT: 5")
    _check_layers("edit.layers", list(p.edit.layers), 0)
    k = p.cluster.k
    _check(
        k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 1),
        f"cluster.k must be 'auto' or a positive integer, got {k!r}",
        "write k: auto or k: 4",
    )
    _check(p.z.shared_steps + p.z.instance_steps >= 1, "z needs at least one step", "paper: 20 and 5")
    section = REGISTRY[p.method].layer_param
    if section:
        layer = getattr(p, section).layer
        _check(
            layer in p.edit.layers,
            f"{section}.layer = {layer} is not one of edit.layers {list(p.edit.layers)}",
            "pick one of edit.layers (the covariance statistics are computed for those)",
        )
    _check_layers("mend.layers", list(p.mend.layers), 1)
    _check_layers("ultraedit.layers", list(p.ultraedit.layers), 0)
    t = p.train_editor
    _choice("train_editor.format", t.format, FORMATS)
    _check(
        len(t.id_range) == 2 and 0 <= t.id_range[0] <= t.id_range[1],
        f"train_editor.id_range must be [first, last] with 0 <= first <= last, got {list(t.id_range)}",
        "e.g. [10000, 19999]: CounterFact records never edited by the default runs",
    )
    _check(
        REGISTRY[p.method].layers_param != "mend" or t.eval_every % p.mend.accumulate == 0,
        f"train_editor.eval_every ({t.eval_every}) must be a multiple of mend.accumulate ({p.mend.accumulate})",
        "a checkpoint is taken after an optimiser step, so that a resumed run continues exactly",
    )
    _check(
        0.0 <= p.alphaedit.nullspace_energy < 1.0,
        f"alphaedit.nullspace_energy must be in [0, 1), got {p.alphaedit.nullspace_energy}",
        "0 uses alphaedit.nullspace_threshold (AlphaEdit's); e.g. 0.01: the directions holding the smallest 1 % of tr(C0)",
    )
    _check(
        0.0 < p.serac.threshold < 1.0,
        f"serac.threshold must be in (0, 1), got {p.serac.threshold}",
        "e.g. 0.95 (chosen on held-out records, params.yaml): a query goes to its best memory entry above it",
    )
    words = list(p.serac.general_words)
    _check(
        len(words) == 2 and 1 <= words[0] <= words[1],
        f"serac.general_words must be [min, max] with 1 <= min <= max, got {words}",
        "e.g. [8, 96]: from prompt-length to paragraph-length windows",
    )
    e = p.evaluate
    bad_tasks = [t for t in e.general_tasks if t not in GENERAL_TASKS]
    _check(not bad_tasks, f"unknown evaluate.general_tasks {bad_tasks}", f"use any of {', '.join(GENERAL_TASKS)}")
    memit_files = (e.attribute_snippets, e.idf, e.tfidf_vocab)
    _check(
        all(f is None for f in memit_files) or all(f is not None for f in memit_files),
        "evaluate.attribute_snippets, evaluate.idf and evaluate.tfidf_vocab go together",
        "set all three (MEMIT's attribute_snippets.json, idf.npy, tfidf_vocab.json) or none",
    )


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Load, type-check and validate params.yaml (plus optional `a.b=value` overrides)."""
    path = Path(path)
    if not path.exists():
        raise EceError(f"params file not found: {path}", "run from the project root, where params.yaml lives")
    try:
        loaded = OmegaConf.load(path)
    except UnicodeDecodeError as exc:
        raise EceError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at byte offset {exc.start})",
            "save params.yaml as UTF-8",
        ) from None
    except yaml.YAMLError as exc:
        raise EceError(
            f"{path} is not valid YAML: {' '.join(str(exc).split())}",
            "fix the YAML syntax at the line named (indentation, brackets, duplicate keys)",
        ) from None
    try:
        schema = OmegaConf.structured(Params)
        merged = OmegaConf.merge(schema, loaded, OmegaConf.from_dotlist(overrides or []))
        params: Params = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise EceError(
            f"invalid value in {path} at '{key}': {exc.msg if hasattr(exc, 'msg') else exc}",
            "check the type of this key against the comments in params.yaml",
        ) from None
    validate(params)
    return params
