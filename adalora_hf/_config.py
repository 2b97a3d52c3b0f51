"""``AdaLoraConfig``: PEFT's documented AdaLoRA configuration, validated at construction.

Reads and writes PEFT's ``adapter_config.json`` (``"peft_type": "ADALORA"``), so a config saved
here loads with ``peft.AdaLoraConfig.from_pretrained`` and the reverse.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import adalora_core

from ._enums import PeftType
from ._io import interrupted_save_hint, write_file_atomic
from ._loftq_config import LoftQConfig, check_loftq_config
from ._serialization import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["AdaLoraConfig"]

logger = logging.getLogger(__name__)

_PEFT_TYPE = PeftType.ADALORA  # a str: equal to "ADALORA", written as it
_TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
_BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"  # target_modules shorthand: every linear layer but the output head

# Fields PEFT writes that this library does not model, with the value at which they do nothing.
# Any other value changes what the adapter means, so loading it here would be silently wrong.
_PEFT_INERT_FIELDS: dict[str, Any] = {
    "use_dora": False,
    "layer_replication": None,
    "lora_bias": False,
    "trainable_token_indices": None,
    "target_parameters": None,
    "ensure_weight_tying": False,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "corda_config": None,
    "eva_config": None,
    "arrow_config": None,
    "kasa_config": None,
    "lora_ga_config": None,
    "monteclora_config": None,
    "velora_config": None,
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalize_enum(value: object) -> object:
    # peft.TaskType / PeftType are str enums; keep the plain string
    return getattr(value, "value", value)


def _check_module_names(name: str, value: object) -> None:
    # target_modules and exclude_modules: None, a list of module names or a regex string
    names_ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if value is not None and not (isinstance(value, str) or names_ok):
        raise ValueError(
            f"{name} must be None, a list of module names or a regex string, got {value!r}."
        )


@dataclass
class AdaLoraConfig:
    """Configuration of an AdaLoRA adapter (PEFT v0.8.2 signature, same defaults).

    AdaLoRA trains ``ΔW = B · diag(E) · A · lora_alpha / init_r`` on each target matrix and moves
    a global budget of rank (triplets ``(A_i, E_i, B_i)``) to the matrices that matter.
    Training runs in three phases, set by ``tinit``, ``tfinal`` and ``total_step``, counted in
    optimizer steps ``1 .. total_step`` (the step ``AdaLoraCallback`` passes to
    ``update_and_allocate``):

    1. Warm-up, steps ``1 .. tinit``: every matrix keeps all ``init_r`` triplets. This
       pre-trains the adapters, so pruning later removes learned directions rather than random
       ones.
    2. Budgeting, steps ``tinit + 1 .. total_step - tfinal``: the total budget decreases on a
       cubic curve from ``init_r · n`` to ``target_r · n`` (n adapted matrices), and every
       ``deltaT`` steps the least important triplets get ``E = 0``. At step
       ``total_step - tfinal`` the final allocation keeps exactly ``target_r · n`` triplets.
    3. Final, the last ``tfinal`` steps: the ranks are fixed; the surviving triplets are
       fine-tuned.

    Worked example: ``tinit=10, tfinal=20, total_step=100`` gives 10 warm-up steps
    (1..10), 70 budgeting steps (11..80) and 20 final steps (81..100).

    Validation happens here, with messages that say what to change: ``ValueError`` for
    impossible settings (``target_r > init_r``, ``tinit >= total_step - tfinal``, betas
    outside (0, 1), ``deltaT < 1``, an unknown ``bias``, ...), ``NotImplementedError`` for
    PEFT features this library does not implement (Megatron, rsLoRA, ``alpha_pattern``).
    ``total_step`` may stay None until ``AdaLoraCallback`` fills it in from the Trainer's
    ``max_steps`` or you set it; ``update_and_allocate`` refuses to run without it.

    >>> cfg = AdaLoraConfig(init_r=12, target_r=8, tinit=10, tfinal=20, total_step=100)
    >>> str(cfg.peft_type), cfg.init_r, cfg.target_r
    ('ADALORA', 12, 8)
    >>> AdaLoraConfig(target_r=16, init_r=12)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the target budget (16, from target_r) is larger than the initial budget (12, ...
    """

    # -- PEFT bookkeeping ---------------------------------------------------------------------
    peft_type: str | None = None  # always "ADALORA" after construction
    auto_mapping: dict[str, Any] | None = None  # base model class, written when task_type is None
    base_model_name_or_path: str | None = None  # where the base model came from (informative)
    revision: str | None = None  # revision of the base model (informative)
    task_type: str | None = None  # one of PEFT's TaskType values, picks the get_peft_model head
    inference_mode: bool = False  # True: adapter frozen (the form saved adapters load in)
    # -- LoRA fields AdaLoRA shares ------------------------------------------------------------
    r: int = 8  # unused by AdaLoRA (PEFT inherits it from LoRA): init_r is the initial rank
    target_modules: list[str] | str | None = None  # names (suffix match) or a full-match regex
    lora_alpha: float = 8  # scaling numerator; the update is scaled by lora_alpha / init_r
    lora_dropout: float = 0.0  # dropout on the adapter's input
    fan_in_fan_out: bool = False  # weight stored (in, out), as transformers' Conv1D (automatic)
    bias: Literal["none", "all", "lora_only"] = "none"  # which biases train with the adapter
    use_rslora: bool = False  # not supported (PEFT's AdaLoRA ignores it): must stay False
    modules_to_save: list[str] | None = None  # modules trained in full and saved (heads)
    init_lora_weights: bool | Literal["gaussian", "loftq"] = True  # False: E random (tests)
    layers_to_transform: list[int] | int | None = None  # only these layer indices
    layers_pattern: list[str] | str | None = None  # name of the layer list, e.g. "layers"
    rank_pattern: dict[str, list[bool]] | None = None  # kept triplets per matrix (allocator)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # not supported: keep empty
    megatron_config: dict[str, Any] | None = None  # not supported: keep None
    megatron_core: str | None = "megatron.core"  # unused without megatron_config
    # LoftQ (init_lora_weights="loftq"): a LoftQConfig or a dict, stored as a dict
    loftq_config: dict[str, Any] | LoftQConfig = field(default_factory=dict)
    # -- AdaLoRA ---------------------------------------------------------------------------------
    target_r: int = 8  # average rank per matrix at the end: the final budget is target_r · n
    init_r: int = 12  # rank of every matrix at creation: the initial budget is init_r · n
    tinit: int = 0  # warm-up steps without pruning
    tfinal: int = 0  # final steps with the ranks fixed
    deltaT: int = 1  # steps between two allocations during budgeting
    beta1: float = 0.85  # EMA coefficient of the sensitivity |p · g|
    beta2: float = 0.85  # EMA coefficient of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty added to the loss
    total_step: int | None = None  # optimizer steps of the run (AdaLoraCallback fills it in)
    # -- PEFT's LoRA fields: exclude_modules works; the others are accepted at the value where
    # they do nothing (see _PEFT_INERT_FIELDS) and refused otherwise ----------------------------
    exclude_modules: list[str] | str | None = None  # not adapted though matched (same matcher)
    use_dora: bool = False  # DoRA is not supported: must stay False
    lora_bias: bool = False  # not supported: must stay False
    layer_replication: list[Any] | None = None  # not supported: keep None
    trainable_token_indices: Any = None  # not supported: keep None
    target_parameters: list[str] | None = None  # not supported: keep None
    use_qalora: bool = False  # not supported: must stay False
    ensure_weight_tying: bool = False  # not supported: must stay False

    def __post_init__(self) -> None:
        self.peft_type = self._check_peft_type(self.peft_type)
        self.task_type = _normalize_enum(self.task_type)  # type: ignore[assignment]
        if isinstance(self.target_modules, (set, frozenset, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, frozenset, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, frozenset, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if self.r != 8:
            warnings.warn(
                f"r={self.r} is not used by AdaLoRA: every matrix starts with init_r "
                f"({self.init_r}) triplets and ends with target_r ({self.target_r}) on average. "
                "Set init_r instead of r.",
                UserWarning,
                stacklevel=3,
            )
        self.validate()

    # -- what PEFT's helpers read (get_peft_model_state_dict, ...) -----------------------------
    @property
    def is_prompt_learning(self) -> bool:
        """False: AdaLoRA adapts layers, it learns no prompt (PEFT's property)."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        """False (PEFT's property)."""
        return False

    # -- validation ---------------------------------------------------------------------------
    @staticmethod
    def _check_peft_type(value: object) -> str:
        value = _normalize_enum(value)
        if value is None or (isinstance(value, str) and value.upper() == _PEFT_TYPE):
            return _PEFT_TYPE
        raise ValueError(
            f"peft_type={value!r} is not an AdaLoRA config: leave peft_type out or set it to "
            f"'{_PEFT_TYPE}'."
        )

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` / ``NotImplementedError`` saying what to change.

        Runs at construction; call it again after changing fields by hand (``AdaLoraModel``
        re-checks the schedule when ``update_and_allocate`` runs).
        """
        self._check_unsupported()
        self._check_lora_fields()
        self._check_adalora_fields()
        self.check_schedule(require_total_step=False)

    def _check_unsupported(self) -> None:
        for key in sorted(_PEFT_INERT_FIELDS.keys() & {f.name for f in fields(self)}):
            value = getattr(self, key)
            if value not in (_PEFT_INERT_FIELDS[key], None, {}, []):
                raise NotImplementedError(
                    f"{key}={value!r} is a PEFT feature adalora does not implement (the adapter "
                    f"would behave differently from PEFT's): leave {key} at its default."
                )
        if self.megatron_config is not None:
            raise NotImplementedError(
                "megatron_config is not supported by adalora (no Megatron tensor-parallel "
                "layers): leave megatron_config=None."
            )
        if self.use_rslora:
            raise NotImplementedError(
                "use_rslora=True is not supported: AdaLoRA scales the update by "
                "lora_alpha / init_r (PEFT's AdaLoRA silently ignores use_rslora). Leave "
                "use_rslora=False and tune lora_alpha instead."
            )
        if self.alpha_pattern:
            raise NotImplementedError(
                "alpha_pattern is not supported by AdaLoRA (PEFT's AdaLoRA silently ignores it): "
                "every matrix uses lora_alpha. Leave alpha_pattern empty."
            )

    def _check_lora_fields(self) -> None:
        if self.bias == "adalora_only":  # PEFT's "<method>_only" spelling of lora_only
            self.bias = "lora_only"
        if self.task_type is not None and self.task_type not in _TASK_TYPES:
            raise ValueError(
                f"task_type={self.task_type!r} is unknown: use None or one of {list(_TASK_TYPES)}."
            )
        if self.bias not in _BIAS_MODES:
            raise ValueError(
                f"bias={self.bias!r} is unknown: use 'none' (no bias trains), 'all' (every bias "
                "trains) or 'lora_only' (the biases of the adapted layers train)."
            )
        if self.init_lora_weights not in (True, False, "gaussian", "loftq"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported by AdaLoRA: use "
                "True (E = 0, A, B ~ N(0, 0.02²); 'gaussian' means the same), False (E random "
                "too, the adapter changes the output from the start) or 'loftq' (with "
                "loftq_config: SVD of the quantization residual, docs/quantized.md)."
            )
        self.loftq_config = check_loftq_config(self.init_lora_weights, self.loftq_config)
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ValueError(f"lora_alpha must be a number, got {self.lora_alpha!r}.")
        if not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}.")
        tm = self.target_modules
        _check_module_names("target_modules", tm)
        if isinstance(tm, list) and not tm:
            raise ValueError(
                "target_modules is an empty list: name the modules to adapt, or leave it None "
                "for the defaults of the model type."
            )
        _check_module_names("exclude_modules", self.exclude_modules)
        if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
            pass  # resolved against the model when the adapter is added
        elif isinstance(tm, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be combined with a regex target_modules: put the "
                "layer indices in the regex, or give target_modules as a list of names."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "layers_pattern is set but layers_to_transform is not: give the layer indices "
                "to adapt in layers_to_transform, or drop layers_pattern."
            )
        ltt = self.layers_to_transform
        if ltt is not None and not (
            _is_int(ltt) or (isinstance(ltt, list) and all(_is_int(i) for i in ltt))
        ):
            raise ValueError(f"layers_to_transform must be an int or a list of ints, got {ltt!r}.")
        mts = self.modules_to_save
        if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
            raise ValueError(f"modules_to_save must be a list of module names, got {mts!r}.")
        rp = self.rank_pattern
        if rp is not None and not (
            isinstance(rp, dict)
            and all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(b, bool) for b in v)
                for k, v in rp.items()
            )
        ):
            raise ValueError(
                "rank_pattern must map '<module>.lora_E' names to lists of bools (True = "
                "triplet kept), as the allocator records it; got "
                f"{type(rp).__name__} {str(rp)[:80]}."
            )

    def _check_adalora_fields(self) -> None:
        # the types of the fields and the config-only rules; the schedule and beta rules (and
        # their messages) are adalora_core's, see check_schedule
        for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}.")
        if self.init_r < 1:
            raise ValueError(
                f"init_r must be >= 1 (the rank every matrix starts with), got {self.init_r}."
            )
        adalora_core.validate_betas(self.beta1, self.beta2)
        w = self.orth_reg_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(
                f"orth_reg_weight must be a number >= 0 (0 turns the penalty off), got {w!r}."
            )

    def check_schedule(self, require_total_step: bool = True) -> None:
        """Check ``init_r``, ``target_r``, ``tinit``, ``tfinal``, ``deltaT`` and ``total_step``
        with ``adalora_core.validate_schedule`` (budgets ``init_r`` and ``target_r`` per matrix).

        ``total_step=None`` passes unless ``require_total_step``, in which case the error names
        the fix (set it, or train with ``AdaLoraCallback``).
        """
        total_step = self.total_step
        if total_step is not None and not _is_int(total_step):
            raise ValueError(f"total_step must be an integer, got {total_step!r}.")
        if require_total_step:
            total_step = adalora_core.require_total_step(total_step)
        adalora_core.validate_schedule(
            init_budget=self.init_r,
            target_budget=self.target_r,
            tinit=self.tinit,
            tfinal=self.tfinal,
            total_step=total_step,
            deltaT=self.deltaT,
        )

    def warn_if_schedule_hurts(self) -> None:
        """Warn (``UserWarning``) when ``total_step`` is known and the schedule leaves less than
        5% of it to the warm-up (``tinit``) or to the final phase (``tfinal``).

        PEFT's defaults (``tinit=0``, ``tfinal=0``) do that: pruning starts from importance
        scores of a single step and the last triplets are cut at the last step, with no step
        left to recover. ``docs/tuning.md`` measures the cost (test cross-entropy +0.04 on one
        classification task, on every seed; +0.01 on average on another; none on its
        language-modelling task; never a gain) and recommends ``tinit`` about 10% and
        ``tfinal`` about 20% of ``total_step``. A warning, not an error: such configs keep
        meaning what they mean in PEFT. ``AdaLoraModel`` calls this once, when training starts.
        """
        total = self.total_step
        if not isinstance(total, int) or total < 20 or self.target_r >= self.init_r:
            return  # unknown, too short to judge, or nothing is pruned
        short = [n for n in ("tinit", "tfinal") if getattr(self, n) < 0.05 * total]
        if short:
            values = " and ".join(f"{n}={getattr(self, n)}" for n in short)
            warnings.warn(
                f"AdaLoRA schedule: {values} with total_step={total} leaves under 5% of the "
                "steps to score triplets before pruning (tinit) or to recover after the last "
                "pruning (tfinal), which can cost quality (measured in docs/tuning.md). Set "
                f"tinit={total // 10} and tfinal={total // 5} (about 10% and 20% of total_step).",
                UserWarning,
                stacklevel=4,
            )

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (PEFT's ``adapter_config.json`` content)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaLoraConfig:
        """Build a config from a dict as PEFT writes it.

        Fields PEFT writes that this class does not know are ignored (logged at debug level)
        when they hold the value at which they do nothing; otherwise (e.g. ``use_dora=True``,
        ``exclude_modules``) the adapter cannot be reproduced here and ``NotImplementedError``
        names the field. ``use_rslora=True`` from a PEFT file is dropped with a warning: PEFT's
        AdaLoRA ignores it, so the adapter was trained without it.
        """
        data = dict(data)
        peft_type = _normalize_enum(data.get("peft_type", _PEFT_TYPE))
        if not isinstance(peft_type, str) or peft_type.upper() != _PEFT_TYPE:
            raise ValueError(
                f"This is a {peft_type} adapter config, not an AdaLoRA one (peft_type must be "
                f"'{_PEFT_TYPE}'): load it with the library that trained it."
            )
        known = {f.name for f in fields(cls)}
        for key in sorted(set(data) - known):
            value = data.pop(key)
            if key in _PEFT_INERT_FIELDS and value not in (_PEFT_INERT_FIELDS[key], None, {}):
                raise NotImplementedError(
                    f"The config sets {key}={value!r}, a PEFT feature adalora does not implement; "
                    f"the adapter would behave differently here. Train it without {key}."
                )
            logger.debug("AdaLoraConfig: ignoring field %r=%r written by PEFT.", key, value)
        if data.get("use_rslora"):
            warnings.warn(
                "The config has use_rslora=True, which PEFT's AdaLoRA ignores: the adapter was "
                "trained with scaling lora_alpha / init_r, so it is loaded with use_rslora=False.",
                UserWarning,
                stacklevel=2,
            )
            data["use_rslora"] = False
        return cls(**data)

    def to_json_bytes(self) -> bytes:
        """The content of ``adapter_config.json`` (indented, keys sorted)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode("utf-8")

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (created if needed), atomically:
        after a crash the file is the old one or the new one, never a truncated one."""
        save_directory = os.fspath(save_directory)
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory!r} is a file; pass a directory.")
        data = self.to_json_bytes()
        os.makedirs(save_directory, exist_ok=True)
        write_file_atomic(os.path.join(save_directory, CONFIG_NAME), data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> AdaLoraConfig:
        """Read ``adapter_config.json`` from a directory (or the file itself), see ``from_dict``.

        Raises ``FileNotFoundError`` when there is none, ``ValueError`` when it is not a JSON
        object or holds invalid settings, ``NotImplementedError`` for PEFT features this library
        does not implement.
        """
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(_not_found(path))
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError
            raise ValueError(
                f"{file} is not valid JSON ({err}): the file is truncated or corrupted. Save the "
                "adapter again, or restore the adapter_config.json written with its weights."
            ) from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{file} holds a JSON {type(data).__name__}, not an object of config fields: it "
                "is not an adapter config. Pass the directory written by save_pretrained."
            )
        return cls.from_dict(data)


def _not_found(path: str) -> str:
    if not os.path.exists(path):
        return (
            f"No adapter at {path!r}: the path does not exist (nothing is downloaded from the "
            "Hub; pass the local directory written by save_pretrained)."
            + interrupted_save_hint(path)
        )
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return (
            f"{path!r} has no {CONFIG_NAME} but a config.json: it looks like a transformers model "
            "directory, not an adapter. Load the base model from it and pass the adapter's "
            f"directory (the one with {CONFIG_NAME} and {WEIGHTS_NAME}) here."
        )
    return (
        f"No {CONFIG_NAME} at {path!r}: pass the directory written by save_pretrained "
        "(nothing is downloaded from the Hub)."
    )
