"""Stage configs: one dataclass per stage, with a help text per field and validation naming the flag.

The sections (model, data, search, train) are shared by the stages that need them, so a dotted flag
such as ``--search.gate_lr`` means the same everywhere.  Reading YAML and flags into these classes is
:mod:`rankalloc.flags`' job.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from .discretize import ROUNDINGS
from .gate_optimizer import GATE_OPTIMIZERS
from .gates import GATE_KINDS
from .errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# --------------------------------------------------------------------------------------------------
# Sections shared by stages
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = _f("minilm-l6", "Base model: a local folder, a hub id, or the built-in 'minilm-l6'.")
    num_layers: int | None = _f(None, "Keep only the first N transformer blocks of every stack, an "
                                "encoder-decoder's decoder too (quick runs, tests).")
    target_modules: list[str] | None = _f(
        None, "Adapter targets: module-name suffixes (e.g. query,value). Default: every Linear-like "
        "projection inside the transformer blocks.")
    target_regex: str | None = _f(None, "Adapter targets: a regex matched against full module names.")

    def validate(self) -> None:
        if self.num_layers is not None and self.num_layers <= 0:
            raise ConfigError(f"--model.num_layers must be a positive integer, got {self.num_layers}")
        if self.target_modules is not None and self.target_regex is not None:
            raise ConfigError("--model.target_modules and --model.target_regex exclude each other; give one")


# The fields of DataConfig that say which examples and columns a task is (not how they are batched),
# including how a task without an evaluation split is split (so that a retrain evaluates on examples its
# search never saw): a rank map records them, and a retrain takes those it is not given from there.
SPLIT_FIELDS = ("split_seed", "eval_fraction")
DATASET_FIELDS = ("task", "eval_file", "hub_config", "text_column", "text_pair_column", "label_column", "family",
                  "choice_columns", "answer_column") + SPLIT_FIELDS


DEFAULT_TASK = "tweets"  # what --task auto reads where no rank map names a task
SPLIT_DEFAULTS = {"split_seed": 0, "eval_fraction": 0.2}  # where no rank map gives them


def with_data_defaults(data: DataConfig) -> DataConfig:
    """``data`` with what no rank map filled in at its defaults: ``--task auto`` as the built-in task, an
    unset split seed and evaluation share as 0 and 0.2 (a search, a sweep, a baseline)."""
    unset = {k: v for k, v in SPLIT_DEFAULTS.items() if getattr(data, k) is None}
    return replace(data, **unset, **({"task": DEFAULT_TASK} if data.task == "auto" else {}))


@dataclass
class DataConfig:
    task: str = _f("auto", "Built-in task name, a local .csv/.json/.jsonl/.parquet file, or a datasets hub "
                   "name; auto: the rank map's task in a retrain from one, else the built-in tweets.")
    eval_file: str | None = _f(None, "Evaluation file for a local-file task (default: a held-out slice).")
    hub_config: str | None = _f(None, "Configuration name of a datasets hub task (e.g. 'sst2').")
    text_column: str = _f("text", "Column holding the text (local files and hub tasks).")
    text_pair_column: str | None = _f(None, "Column holding the second text of a pair task.")
    label_column: str = _f("label", "Column holding the label: a class id or name, a float target (regression), "
                           "or the index or text of the right option (multiple choice).")
    family: str = _f("auto", "Task family: classification, regression, multiple_choice, causal_lm, or auto "
                     "(multiple_choice with --data.choice_columns, causal_lm with --data.answer_column, "
                     "regression for non-integer float labels, else classification; built-in tasks know theirs).")
    choice_columns: list[str] | None = _f(None, "Multiple choice: one column holding a list of options per row, "
                                          "or several columns holding one option each (e.g. ending0,ending1).")
    answer_column: str | None = _f(None, "Causal LM: the column holding the answer text that follows the prompt "
                                   "in --data.text_column (the loss is on the answer only).")
    max_length: int = _f(64, "Tokens per example after truncation.")
    max_train_examples: int | None = _f(4000, "Cap on training examples (weight + gate split); null = all.")
    max_eval_examples: int | None = _f(2000, "Cap on evaluation examples; null = all.")
    eval_fraction: float | None = _f(None, "Share held out for evaluation when a task has no evaluation split "
                                     "(default: the rank map's in a retrain from one, else 0.2).")
    gate_fraction: float = _f(0.2, "Share of the training data held out for gate steps (search only).")
    batch_size: int = _f(32, "Examples per training batch.")
    eval_batch_size: int = _f(128, "Examples per evaluation batch.")
    split_seed: int | None = _f(None, "Seed of the train/eval split and the example caps, kept apart from --seed "
                                "so that every run sees the same examples (default: the rank map's in a retrain "
                                "from one, else 0).")

    def validate(self) -> None:
        from .families import FAMILIES

        if self.family not in FAMILIES + ("auto",):
            raise ConfigError(f"--data.family must be auto or one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.split_seed is not None:
            check_seed(self.split_seed, "--data.split_seed")
        if self.max_length <= 0:
            raise ConfigError(f"--data.max_length must be a positive integer, got {self.max_length}")
        if self.batch_size <= 0:
            raise ConfigError(f"--data.batch_size must be a positive integer, got {self.batch_size}")
        if self.eval_batch_size <= 0:
            raise ConfigError(f"--data.eval_batch_size must be a positive integer, got {self.eval_batch_size}")
        for name in ("eval_fraction", "gate_fraction"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v < 1.0:
                raise ConfigError(f"--data.{name} must lie strictly between 0 and 1, got {v}")
        for name in ("max_train_examples", "max_eval_examples"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--data.{name} must be a positive integer or null, got {v}")


@dataclass
class SearchParams:
    r_max: int | None = _f(None, "Largest rank any layer may get during the search; auto or null = automatic "
                           "(the smallest power of two at or above 2.5x the uniform rank that the budget "
                           "affords, at least 4, at most 64: 4x the uniform rank at r = 1, 2, 4, 8; above a "
                           "uniform rank of 51, the power of two at or above 1.25x it).")
    scale: float = _f(2.0, "LoRA scale s = alpha / r, the same for every rank (alpha = scale * r).")
    steps: int = _f(30, "Weight steps of the search (each followed by a gate step once gates move). 30 matched "
                    "60 and 180 in accuracy at a half and a sixth of the cost (benchmarks/LOG.md).")
    weight_lr: float = _f(1e-3, "AdamW learning rate of the adapter weights and the task head.")
    gate_lr: float = _f(0.05, "Learning rate of the rank gates.")
    gate_optimizer: str = _f("adam", "Optimiser of the gates: 'adam' (each gate normalised by its own gradient "
                             "history) or 'shared_adam' (one second moment for all gates, so the relative sizes "
                             "of the gate gradients survive; see rankalloc/gate_optimizer.py).")
    lambda_lr: float = _f(0.5, "Dual-ascent step size of the Lagrange multiplier.")
    penalty: float = _f(2.0, "Quadratic penalty rho * ((C-B)/B)^2 added to the gate loss (damps oscillation).")
    gate_every: int = _f(1, "Run a gate step after every k-th weight step.")
    warmup_steps: int = _f(5, "Weight steps before gates start moving.")
    budget_warmup: float = _f(0.4, "Fraction of the steps over which the cost target falls from the "
                              "initial expected cost to the budget.")
    gates: str = _f("hard_concrete", "Gate parameterisation: 'hard_concrete' (one L0 gate per rank-1 component) or "
                    "'nested' (one categorical over each layer's rank, nested masks; DARTS style).")
    gate_init: float = _f(0.9, "Initial keep-probability of each rank component (nested gates: expected rank / r_max).")
    project_cost: bool = _f(True, "Once the cost target has reached the budget, follow each gate step by "
                            "a projection (one common shift of all gate logits) onto C = B exactly, which "
                            "removes the overshoot of dual ascent.")
    project_ramp: bool = _f(False, "Also project onto the falling cost target during the budget ramp, so that C "
                            "follows the target smoothly instead of snapping onto B when the target reaches "
                            "it (needs project_cost).")
    lagrangian_at_budget: bool = _f(True, "Keep the Lagrangian term in the gate loss once the projection holds "
                                    "C = B; false = from then on the gate loss is the held-out loss alone (the "
                                    "projection keeps the budget) and the gate optimiser's moments restart, so the "
                                    "scores rank gates by held-out loss rather than by cost per rank (needs "
                                    "project_cost).")
    temperature: float = _f(0.5, "Gate temperature: beta for hard-concrete gates, the Gumbel-softmax temperature for "
                            "nested ones (lower = closer to binary samples).")
    temperature_final: float | None = _f(None, "Anneal the gate temperature geometrically from 'temperature' "
                                         "at the first gate step to this value at the last one (null = "
                                         "constant).")
    lora_dropout: float = _f(0.0, "Dropout on the adapter input.")
    log_every: int = _f(20, "Weight steps between log lines.")
    checkpoint_every: int = _f(10, "Weight steps between checkpoints (0 = only at the end).")
    gap_batches: int = _f(8, "Held-out batches used to measure the discretisation gap.")
    rounding: str = _f("knapsack", "From gate scores to ranks: 'knapsack' (maximise the summed keep-probability: "
                       "score per parameter) or 'probability' (keep components in order of keep-probability "
                       "until the budget is full).")

    def validate(self) -> None:
        if self.r_max is not None and self.r_max <= 0:
            raise ConfigError(f"--search.r_max must be a positive integer or 'auto', got {self.r_max}")
        for name in ("steps", "gate_every", "log_every", "gap_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--search.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--search.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("weight_lr", "gate_lr", "lambda_lr", "scale", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--search.{name} must be > 0, got {getattr(self, name)}")
        if self.temperature_final is not None and not self.temperature_final > 0:
            raise ConfigError(f"--search.temperature_final must be > 0 or null, got {self.temperature_final}")
        if self.penalty < 0:
            raise ConfigError(f"--search.penalty must be >= 0, got {self.penalty}")
        if self.gate_optimizer not in GATE_OPTIMIZERS:
            raise ConfigError(f"--search.gate_optimizer must be one of {', '.join(GATE_OPTIMIZERS)}, "
                              f"got {self.gate_optimizer!r}")
        if self.gates not in GATE_KINDS:
            raise ConfigError(f"--search.gates must be one of {', '.join(GATE_KINDS)}, got {self.gates!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"--search.rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if not 0.0 <= self.budget_warmup < 1.0:
            raise ConfigError(f"--search.budget_warmup must lie in [0, 1), got {self.budget_warmup}")
        ramp = int(self.budget_warmup * self.steps)
        if self.warmup_steps + ramp >= self.steps:
            raise ConfigError(f"--search.warmup_steps {self.warmup_steps} plus the budget ramp ({ramp} steps, "
                              f"--search.budget_warmup {self.budget_warmup}) leaves no gate step at the budget in "
                              f"--search.steps {self.steps}; allowed: warmup_steps 0 to {self.steps - ramp - 1}")
        if not self.lagrangian_at_budget and not self.project_cost:
            raise ConfigError("--search.lagrangian_at_budget false needs --search.project_cost true: without the "
                              "projection nothing would hold the budget")
        if not 0.0 < self.gate_init < 1.0:
            raise ConfigError(f"--search.gate_init must lie strictly between 0 and 1, got {self.gate_init}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--search.lora_dropout must lie in [0, 1), got {self.lora_dropout}")


# --------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------
@dataclass
class SearchConfig:
    """`python -m rankalloc.search`: learn gates under a budget, write a rank map."""

    budget: str | None = _f(None, "Adapter parameter budget: 500000, 500k, 0.5M, or 0.5% of the base model.")
    seed: int = _f(0, "Seed of data order, initialisation and gate sampling.")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N.")
    out: str | None = _f(None, "Run folder (default: a new folder under runs/).")
    max_steps: int | None = _f(None, "Cap on weight steps, for quick runs (overrides search.steps if lower; the "
                               "weight warm-up shrinks in proportion, as the budget ramp does).")
    overwrite: bool = _f(False, "Replace an existing run folder (kept in OUT.replaced until the new run finishes).")
    resume: bool = _f(False, "Continue the run in --out from its last checkpoint.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchParams = field(default_factory=SearchParams)

    def validate(self) -> None:
        if self.budget is None:
            raise ConfigError("--budget is required (e.g. --budget 0.5M, 500k, 500000 or 0.5%)")
        _validate_common(self)
        self.model.validate()
        self.data.validate()
        self.search.validate()
        check_gate_steps(self.search, self.max_steps, [self.search.gate_every], "--search.gate_every")

    def steps(self) -> int:
        """Weight steps this run will take (``--max-steps`` caps ``search.steps``)."""
        return self.search.steps if self.max_steps is None else min(self.search.steps, self.max_steps)

    def warmup_steps(self) -> int:
        """Weight steps before the first gate step: ``search.warmup_steps``, shrunk in proportion when
        ``--max-steps`` cuts the run, so that a short run still moves its gates and reaches the budget."""
        return self.search.warmup_steps * self.steps() // self.search.steps


@dataclass
class ExportConfig:
    """`python -m rankalloc.export`: re-discretise a finished search at another budget or rank cap."""

    run: str | None = _f(None, "Folder of a finished search (holds scores.json).")
    budget: str | None = _f(None, "New budget (default: the searched one): 500k, 0.3M, 0.5%, ...")
    max_rank: int | None = _f(None, "Cap on every module's rank (e.g. 8, 16, 32, 64 for serving stacks).")
    rounding: str | None = _f(None, "knapsack or probability (see --search.rounding); default: the search's.")
    out: str | None = _f(None, "Output folder (default: RUN/exports/<budget>[-r<cap>][-<rounding>]).")
    overwrite: bool = _f(False, "Replace an existing export folder (restored if the new export fails).")

    def validate(self) -> None:
        if self.run is None:
            raise ConfigError("--run is required: the folder of a finished search")
        if self.max_rank is not None and self.max_rank <= 0:
            raise ConfigError(f"--max-rank must be a positive integer, got {self.max_rank}")
        if self.rounding is not None and self.rounding not in ROUNDINGS:
            raise ConfigError(f"--rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")


@dataclass
class TrainParams:
    """The one recipe every retrain method shares; only the adapter shape differs between methods."""

    epochs: int = _f(2, "Passes over the training examples (the search's weight + gate splits).")
    lr: float = _f(2e-3, "AdamW learning rate of the LoRA weights and the task head (rank map and uniform).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_ratio: float = _f(0.06, "Share of the steps with a linear learning-rate warm-up; then linear decay to 0.")
    scale: float = _f(2.0, "LoRA scale s = alpha / r, the same for every module and method (alpha = scale * r; "
                      "AdaLoRA: alpha = scale * init_r, as it divides by its initial rank).")
    lora_dropout: float = _f(0.0, "Dropout on the adapter input.")
    log_every: int = _f(25, "Steps between log lines.")
    checkpoint_every: int = _f(100, "Steps between checkpoints, and one after the last step (0: none); rerunning a "
                               "killed retrain resumes from its last one (AdaLoRA's with its allocator's running "
                               "scores).")
    gradient_batches: int = _f(32, "Training batches whose mean loss gradient scores the components of "
                               "--baseline gradient.")
    adalora_lr: float = _f(5e-3, "AdamW learning rate of AdaLoRA (its authors tune a larger one than LoRA's; "
                           "5e-3 was best of 2e-3/5e-3/1e-2 on tweets at 82,944 parameters).")
    adalora_init_ratio: float = _f(1.5, "AdaLoRA's initial budget as a multiple of the final one (the paper's "
                                   "b(0) = 1.5 b(T)); sets init_r.")
    adalora_tinit: float = _f(0.1, "Share of the steps before AdaLoRA starts pruning (its tinit).")
    adalora_tfinal: float = _f(0.4, "Share of the steps at the final ranks after pruning (its tfinal); the steps "
                               "between tinit and tfinal are the budget-decrease phase.")
    adalora_delta_t: int = _f(1, "Steps between AdaLoRA's re-allocations during the decrease phase (its deltaT).")
    adalora_beta1: float = _f(0.85, "EMA coefficient of AdaLoRA's sensitivity smoothing.")
    adalora_beta2: float = _f(0.85, "EMA coefficient of AdaLoRA's uncertainty estimate.")
    adalora_orth_reg_weight: float = _f(0.1, "Weight of AdaLoRA's orthogonality regulariser on P and Q.")

    def validate(self) -> None:
        for name in ("epochs", "log_every", "gradient_batches", "adalora_delta_t"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--train.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "adalora_lr", "scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--train.{name} must be > 0, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--train.checkpoint_every must be >= 0 (0: no checkpoints), got {self.checkpoint_every}")
        for name in ("weight_decay", "adalora_orth_reg_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("warmup_ratio", "lora_dropout", "adalora_tinit", "adalora_tfinal"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--train.{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.adalora_tinit + self.adalora_tfinal >= 1.0:
            raise ConfigError(f"--train.adalora_tinit + --train.adalora_tfinal must be below 1 (leaving a "
                              f"budget-decrease phase), got {self.adalora_tinit} + {self.adalora_tfinal}")
        for name in ("adalora_beta1", "adalora_beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"--train.{name} must lie strictly between 0 and 1, got {getattr(self, name)}")
        if self.adalora_init_ratio < 1.0:
            raise ConfigError(f"--train.adalora_init_ratio must be >= 1 (AdaLoRA prunes from its initial "
                              f"budget down to --budget), got {self.adalora_init_ratio}")


BASELINES = ("uniform", "random", "gradient", "adalora")
#: the sweep's baselines: its study fixes the "method" choices, so adding one would orphan existing studies
SWEEP_BASELINES = ("uniform", "adalora")


@dataclass
class RetrainConfig:
    """`python -m rankalloc.retrain`: train a fixed-rank peft adapter from a rank map, or a baseline."""

    rank_map: str | None = _f(None, "rank_map.json of a search or export (give this or --baseline).")
    baseline: str | None = _f(None, "Instead of a rank map: 'uniform' (one rank everywhere), 'random' "
                              "(random scores through the search's knapsack, seeded by --seed), 'gradient' "
                              "(scores from the frozen weights' loss gradients, the same knapsack) or "
                              "'adalora' (peft AdaLoRA), all at --budget.")
    budget: str | None = _f(None, "Adapter parameter budget of a baseline: 500000, 500k, 0.5M or 0.5%.")
    init_from: str | None = _f(None, "A finished search folder: start the adapters (its highest-ranked components "
                               "per module) and the task head from the search's trained weights instead of a "
                               "fresh initialisation (with --rank-map only).")
    merge: bool = _f(False, "Also write merged/: the adapter merged into the base weights, with the tokenizer.")
    seed: int = _f(0, "Seed of initialisation and data order.")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N.")
    out: str | None = _f(None, "Run folder (default: a new folder under runs/).")
    max_steps: int | None = _f(None, "Cap on optimisation steps, for quick runs (schedules shrink to fit).")
    overwrite: bool = _f(False, "Replace an existing run folder (kept in OUT.replaced until the new run finishes).")
    resume: bool = _f(False, "Continue the run in --out from its last checkpoint (rerunning does so too).")
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="auto"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainParams = field(default_factory=TrainParams)

    def validate(self) -> None:
        if (self.rank_map is None) == (self.baseline is None):
            raise ConfigError("give exactly one of --rank-map RUN/rank_map.json or --baseline "
                              f"{'|'.join(BASELINES)}")
        if self.baseline is not None:
            if self.baseline not in BASELINES:
                raise ConfigError(f"--baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
            if self.budget is None:
                raise ConfigError(f"--baseline {self.baseline} needs --budget (e.g. --budget 82944, 80k or 0.4%)")
        elif self.budget is not None:
            raise ConfigError("--budget applies to --baseline only; a rank map carries its own budget")
        if self.init_from is not None and self.rank_map is None:
            raise ConfigError("--init-from starts a rank map's adapters from its search; it needs --rank-map "
                              "(baselines always start fresh)")
        _validate_common(self)
        self.model.validate()
        self.data.validate()
        self.train.validate()


TUNABLE = ("weight_lr", "gate_lr", "r_max", "gate_every", "temperature")
SHARED_BUDGETS = ("geomean", "max")


@dataclass
class SweepConfig:
    """`python -m rankalloc.sweep`: an optuna study of adapter parameters versus accuracy over budgets."""

    budgets: list[str] | None = _f(None, "Budgets to sweep: a list (41k,83k,166k,332k) or a log-spaced range "
                                   "LO:HI:N (40k:400k:4 = 4 budgets); absolute parameter counts.")
    baseline: list[str] | None = _f(None, "Also train these baselines at every budget, in the same study and "
                                    "report: uniform and/or adalora.")
    tune: list[str] | None = _f(None, "Search hyperparameters to tune per trial (multi-objective TPE, one "
                                "search per trial): weight_lr, gate_lr, r_max, gate_every, temperature.")
    n_trials: int | None = _f(None, "Trials this worker runs at most; null = until every budget (and "
                              "baseline) is complete. With --tune: tuned trials in the whole study "
                              "(null = 4 per budget).")
    storage: str | None = _f(None, "optuna storage: sqlite:///FILE.db, postgresql://USER:PW@HOST/DB, "
                             "mysql://..., or journal:FILE (also a FILE.log / FILE.jsonl path); null = "
                             "sqlite in --out.")
    study_name: str = _f("rankalloc-sweep", "Study to create or resume (completed trials are never rerun).")
    shared_search: bool = _f(True, "Search once and re-export every budget from it (false: a full search "
                             "per budget). Ignored with --tune, which searches per trial.")
    shared_budget: str = _f("geomean", "Budget of the shared search: 'geomean' (the geometric middle of the "
                            "budgets: every budget is then at most sqrt(max/min) away from it), 'max', or a budget.")
    heartbeat_interval: int = _f(60, "Seconds between a running trial's heartbeats (RDB storages).")
    grace_period: int = _f(180, "Seconds without a heartbeat after which a trial counts as crashed: it is "
                           "failed and retried by another worker.")
    max_retry: int = _f(3, "Retries of a crashed trial (its point is retried as a new trial).")
    poll_interval: float = _f(10.0, "Seconds between looks at the study while the remaining trials run in "
                              "other workers.")
    seed: int = _f(0, "Seed of every search and retrain (and of the grid sampler). With --tune the TPE sampler "
                   "also mixes in the worker's process id, so parallel workers propose different points: a "
                   "tuned study's trials depend on its workers, its runs on this seed.")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N.")
    out: str | None = _f(None, "Sweep folder (default: runs/sweep-<study name>): shared search, trials, "
                         "pareto.csv/.md/.png, the default SQLite storage.")
    max_steps: int | None = _f(None, "Cap on optimisation steps of every search and retrain, for quick runs.")
    overwrite: bool = _f(False, "Start afresh: --out moves to OUT.replaced (deleted when this sweep "
                         "finishes); a study in its own --storage is deleted.")
    resume: bool = _f(False, "Require the study to exist already (a sweep always resumes an existing one).")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchParams = field(default_factory=SearchParams)
    train: TrainParams = field(default_factory=TrainParams)

    def validate(self) -> None:
        if not self.budgets:
            raise ConfigError("--budgets is required (e.g. --budgets 41k,83k,166k,332k or a range 40k:400k:4)")
        for name in self.baseline or []:
            if name not in SWEEP_BASELINES:
                raise ConfigError(f"--baseline must be among {', '.join(SWEEP_BASELINES)}, got {name!r}")
        for name in self.tune or []:
            if name not in TUNABLE:
                raise ConfigError(f"--tune: {name!r} cannot be tuned; allowed: {', '.join(TUNABLE)}")
        if self.n_trials is not None and self.n_trials <= 0:
            raise ConfigError(f"--n-trials must be a positive integer, got {self.n_trials}")
        if not self.study_name.strip():
            raise ConfigError("--study-name must not be empty")
        for name in ("heartbeat_interval", "grace_period"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.grace_period <= self.heartbeat_interval:
            raise ConfigError(f"--grace_period ({self.grace_period}) must exceed --heartbeat_interval "
                              f"({self.heartbeat_interval}), or live trials would count as crashed")
        if self.max_retry < 0:
            raise ConfigError(f"--max_retry must be >= 0, got {self.max_retry}")
        if not self.poll_interval > 0:
            raise ConfigError(f"--poll_interval must be > 0, got {self.poll_interval}")
        _validate_common(self)
        self.model.validate()
        self.data.validate()
        self.search.validate()
        self.train.validate()
        check_gate_steps(self.search, self.max_steps, [self.search.gate_every], "--search.gate_every")
        if "gate_every" in (self.tune or []):
            check_gate_steps(self.search, self.max_steps, list(range(1, GATE_EVERY_TUNE_MAX + 1)),
                             f"--tune gate_every (which tries 1 to {GATE_EVERY_TUNE_MAX}):")


GATE_EVERY_TUNE_MAX = 4  # the largest gate_every a tuned sweep tries


def check_gate_steps(search: SearchParams, max_steps: int | None, gate_every: list[int], flag: str) -> None:
    """Refuse a ``gate_every`` that leaves a run with no gate step once its cost target is the budget: the
    gates would never learn under the budget, nor the projection hold it.  A gate step follows weight
    step ``n`` (counted from 1) when ``n`` is a multiple of ``gate_every`` and lies after the warm-up
    (which ``--max-steps`` shrinks in proportion); the target is the budget from weight step
    ``warm-up + int(budget_warmup * steps) + 1`` on, counted on the run's own length."""
    last = search.steps if max_steps is None else min(search.steps, max_steps)
    first = search.warmup_steps * last // search.steps
    at_budget = first + max(int(search.budget_warmup * last), 0)
    for k in gate_every:
        if last // k <= at_budget // k:  # no multiple of k in at_budget+1 .. last
            what = (f"weight steps {at_budget + 1} to {last}" if at_budget < last else
                    f"no weight step (warm-up {first} and budget ramp {at_budget - first} fill all {last})")
            raise ConfigError(f"{flag} {k} leaves no gate step at the budget in this run: the cost target reaches "
                              f"the budget for {what}, and a gate step follows those whose number is a "
                              f"multiple of it; allowed: a smaller value, a shorter --search.budget_warmup or "
                              f"--search.warmup_steps, or a longer run")


MAX_SEED = 2**32 - 1  # numpy's legacy generator takes no more


def check_seed(seed: int, flag: str = "--seed") -> None:
    """Raises: ConfigError when ``seed`` is negative or above what every generator takes."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{flag} must be an integer from 0 to {MAX_SEED}, got {seed}")


def _validate_common(cfg: Any) -> None:
    check_seed(cfg.seed)
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise ConfigError(f"--max-steps must be a positive integer, got {cfg.max_steps}")
    if not (cfg.device in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", cfg.device)):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite and --resume exclude each other; give one")
