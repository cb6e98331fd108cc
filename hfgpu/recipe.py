"""Recipes: the YAML that describes a fine-tuning run, validated by a schema that is its documentation.

    recipe = load_recipe("recipes/demo_cpu.yaml", ["train.epochs=2", "data.path=my.jsonl"])

Every knob the planner can choose may be "auto". Unknown keys get a "did you mean"; every problem is
reported at once, in one line. Paths are relative to the working directory; `hfgpu:` names a file
that ships inside the package (`hfgpu:demo/model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from hfgpu._fuzzy import did_you_mean
from hfgpu._package import PACKAGE, PACKAGE_INSTALLS, resolve_path  # noqa: F401  (re-exported: callers import them from here)
from hfgpu.errors import HfgpuError
from hfgpu.knobs import AUTO, KNOB_FIELDS, recipe_key

Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _annotation(meta: dict) -> Any:
    kind = meta["kind"]
    if kind == "choice":
        return Literal[(AUTO, *meta["choices"]) if meta["auto"] else tuple(meta["choices"])]
    if kind == "int":
        base = Annotated[int, Field(ge=meta["minimum"])]
    elif kind == "float":
        base = Annotated[float, Field(ge=0, lt=1)]
    elif kind == "names":
        base = Union[list[str], Literal["all-linear"]]
    else:
        base = bool
    return Union[base, Auto] if meta["auto"] else base


def knob_fields(section: str) -> dict[str, Any]:
    """The recipe fields of the knobs that live in `section` ("" for the top level), built from the
    knob record (hfgpu.knobs.Knobs): one place says each knob's type, default and description."""
    out = {}
    for f in KNOB_FIELDS:
        where, _, leaf = recipe_key(f.name).rpartition(".")
        if where == section:
            out[leaf] = (_annotation(f.metadata), Field(f.default, description=f.metadata["help"]))
    return out


def _with_knobs(base: type[BaseModel], section: str) -> Any:
    return create_model(base.__name__.lstrip("_"), __base__=base, __module__=__name__, __doc__=base.__doc__, **knob_fields(section))


FORMATS = ("text", "alpaca", "prompt_completion", "chat", "preference", "unpaired")


class MixSource(_Strict):
    """One dataset of a mixture (data.mix): where it is, its own format and columns, and how much of it to use."""

    path: str = Field(description="local file or folder, or a Hub dataset id")
    name: str | None = Field(None, description="what logs and per-source eval metrics call it (default: the file's stem or the id)")
    format: Literal[FORMATS] | None = Field(None, description="its format (default: data.format)")
    columns: dict[str, str] | None = Field(None, description="its column renames (default: data.columns)")
    split: str = Field("train", description="split to train on")
    eval_split: str | None = Field(None, description="its split to evaluate on (per-source eval metrics)")
    eval_path: str | None = Field(None, description="its own eval file")
    weight: float | None = Field(
        None, gt=0, description="its share of the weighted sources' examples (none repeats: the mixture is as large as the scarcest allows)"
    )
    samples: int | None = Field(None, ge=1, description="exactly this many of its examples (seeded; repeated when it has fewer)")

    @model_validator(mode="after")
    def _one_amount(self) -> "MixSource":
        if self.weight is not None and self.samples is not None:
            raise ValueError(f"weight={self.weight:g} and samples={self.samples} both size {self.path!r}: keep one")
        if self.eval_split and self.eval_path:
            raise ValueError(f"eval_split and eval_path both choose {self.path!r}'s eval rows: keep one")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return Path(self.path).stem if Path(resolve_path(self.path)).exists() else self.path


class _DataConfig(_Strict):
    """What to train on, and how rows become token sequences."""

    path: str | None = Field(None, description="local json/jsonl/csv/parquet/txt file or folder, or a Hub dataset id (or data.mix)")
    mix: list[MixSource] | None = Field(
        None, min_length=1, description="several datasets instead of data.path, each with its own format, columns and weight or samples"
    )
    format: Literal[FORMATS] = Field("alpaca", description="how rows become prompts and completions")
    columns: dict[str, str] = Field(default_factory=dict, description="rename the format's fields, e.g. {output: answer}")
    split: str = Field("train", description="split of a Hub dataset (or of the local file) to train on")
    eval_split: str | None = Field(None, description="split to evaluate on (Hub datasets)")
    eval_path: str | None = Field(None, description="a separate local file to evaluate on")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="hold out this fraction of the training rows (seeded, the same every run) when there is no eval file"
    )
    train_on_prompt: bool = Field(False, description="also learn the prompt tokens (instruction and chat formats)")
    too_long: Literal["truncate", "drop"] = Field("truncate", description="what to do with examples longer than max_seq_len")
    chat_template: str | None = Field(None, description="a Jinja chat template, when the tokenizer has none")

    @model_validator(mode="after")
    def _path_or_mix(self) -> "_DataConfig":
        if (self.path is None) == (self.mix is None):
            raise ValueError(
                "data.path and data.mix both name the training data: keep one"
                if self.path is not None
                else "no training data: set data.path (a file, folder or Hub id) or data.mix (a list of datasets)"
            )
        if self.mix is not None:
            for key, default in (("split", "train"), ("eval_split", None), ("eval_path", None)):
                if getattr(self, key) != default:
                    raise ValueError(f"data.{key} with data.mix: give each dataset its own {key} (data.mix[i].{key})")
            labels = [m.label for m in self.mix]
            if len(set(labels)) < len(labels):
                twice = next(x for x in labels if labels.count(x) > 1)
                raise ValueError(f"two datasets of data.mix are called {twice!r}: give one a name (data.mix[i].name)")
        return self


DataConfig = _with_knobs(_DataConfig, "data")


class EarlyStopping(_Strict):
    """Stop when the eval loss has not improved for a while."""

    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="smallest eval-loss decrease that counts as improvement")


class _TrainConfig(_Strict):
    """The optimization: length, learning rate and schedule, clipping, eval, checkpoints, logging."""

    epochs: float | None = Field(1, gt=0, description="passes over the data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate schedule after the warm-up")
    warmup: float = Field(0.03, ge=0, description="warm-up: a fraction of the steps (< 1) or a number of steps (≥ 1)")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (AdamW)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null to disable")
    seed: int = Field(0, description="data order, initialization and dropout")
    eval_every: int | None = Field(None, ge=1, description="evaluate every N steps (and at the end); null: only at the end")
    save_every: int | None = Field(None, ge=1, description="checkpoint every N steps; null: no intermediate checkpoints")
    keep_last: int = Field(2, ge=1, description="checkpoints to keep")
    early_stopping: EarlyStopping | None = Field(None, description="stop when the eval loss stops improving (needs eval data)")
    log_every: int = Field(10, ge=1, description="log the training loss every N steps")


TrainConfig = _with_knobs(_TrainConfig, "train")


class _LoraSection(_Strict):
    """The adapters (LoRA and QLoRA runs)."""


LoraSection = _with_knobs(_LoraSection, "lora")


class EvalConfig(_Strict):
    """Evaluation beyond the eval loss."""

    metrics: list[Literal["exact_match", "accuracy"]] = Field(default_factory=list, description="task metrics on generated answers")
    max_new_tokens: int = Field(32, ge=1, description="longest generated answer, in tokens")
    max_examples: int | None = Field(200, ge=1, description="eval examples to generate for task metrics")
    max_generation_seconds: float | None = Field(
        300, gt=0, description="stop generating answers after this long per evaluation (scores cover the answers made); null: no limit"
    )


class PreferenceConfig(_Strict):
    """The preference objectives' hyper-parameters (objective dpo, ipo, simpo, orpo, kto); null: the paper's value."""

    beta: float | None = Field(
        None,
        gt=0,
        description="β: how far the policy may move from the reference (DPO/IPO/KTO 0.1), SimPO's reward scale (2.0), "
        "ORPO's odds-ratio weight λ (0.1)",
    )
    gamma_ratio: float = Field(0.5, ge=0, description="SimPO: the target reward margin γ as a share of β (γ/β = 0.5, the paper's)")
    desirable_weight: float = Field(
        1.0, gt=0, description="KTO: the loss weight of desirable completions (λ_D; the paper keeps λ_D·n_D / λ_U·n_U in [1, 4/3])"
    )
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: the loss weight of undesirable completions (λ_U)")


class HubConfig(_Strict):
    """Where the finished run is pushed."""

    repo_id: str | None = Field(None, description="owner/name: push the finished run there (needs HF_TOKEN)")
    private: bool = Field(True, description="create the repo private")
    base_model_id: str | None = Field(
        None, description="owner/name of the base on the Hub, when the run trains from a local folder or file (the pushed adapter names it)"
    )


class _Recipe(_Strict):
    """A fine-tuning run: the model, the card, the knobs (top level), the data, the training, the adapters, where it goes."""

    model: str = Field(description="Hub repo id or local folder of the base model, or a .gguf file (dequantized to train)")
    gguf_file: str | None = Field(None, description="a .gguf file inside the `model` folder: read as model: FOLDER/FILE.gguf")
    gpu: str = Field("auto", description="card to plan for: a catalog name, '12GB', 'cpu', or auto (this machine)")
    data: DataConfig = Field(description="what to train on")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the optimization")
    lora: LoraSection = Field(default_factory=LoraSection, description="the adapters (LoRA and QLoRA)")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation beyond the eval loss")
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="the preference objectives' hyper-parameters (objective dpo, ipo, simpo, orpo, kto)"
    )
    output_dir: str = Field("outputs/run", description="where the adapter, logs and checkpoints go")
    overwrite: bool = Field(False, description="replace an earlier run in output_dir")
    resume: Literal["never", "auto"] | str = Field(
        "never", description="auto: continue from the newest good checkpoint (or start, when there is none yet); or a checkpoint path"
    )
    resume_force: bool = Field(
        False, description="resume although the data or a training setting changed since the checkpoint (the new values apply from there)"
    )
    report_to: Literal["none", "tensorboard", "wandb"] = Field("none", description="a tracker for the metrics (install its package)")
    trust_remote_code: bool = Field(False, description="run the model repo's own Python code (off unless you trust the repo)")
    hub: HubConfig = Field(default_factory=HubConfig, description="push the finished run to the Hub")

    @model_validator(mode="before")
    @classmethod
    def _gguf_file_in_folder(cls, raw: Any) -> Any:
        """`model: FOLDER` + `gguf_file: FILE.gguf` is read as `model: FOLDER/FILE.gguf`, the one form a run records
        (so `gguf_file` is always None once the recipe is read)."""
        if not isinstance(raw, dict) or raw.get("gguf_file") is None:
            return raw
        name, folder = raw["gguf_file"], raw.get("model")
        if not isinstance(name, str) or not name.lower().endswith(".gguf") or Path(name).name != name:
            raise ValueError(f"gguf_file={name!r} is not a .gguf file name: name the file inside the model folder")
        if not isinstance(folder, str):
            raise ValueError("gguf_file needs model: the folder that holds the file")
        return {**{k: v for k, v in raw.items() if k != "gguf_file"}, "model": str(Path(folder) / name)}

    @model_validator(mode="after")
    def _objective_and_format(self) -> "_Recipe":
        from hfgpu.objectives import REGISTRY

        objective = getattr(self, "objective", "sft")
        record = REGISTRY[objective]
        pairs = record.preference
        fmt = self.data.format
        wanted, shape = record.data_format, record.rows
        if pairs and "format" not in self.data.model_fields_set:
            self.data.format = wanted  # what a preference objective trains on
        elif pairs and fmt != wanted:
            raise ValueError(f"objective={objective} trains on {shape}, not data.format={fmt}: set data.format={wanted}")
        elif not pairs and fmt == "preference":
            raise ValueError("data.format=preference holds pairs of responses: set objective=dpo (or ipo, simpo, orpo) to train on them")
        elif not pairs and fmt == "unpaired":
            raise ValueError("data.format=unpaired holds completions labelled desirable or not: set objective=kto to train on them")
        if pairs and self.data.mix is not None:
            raise ValueError(f"data.mix with objective={objective}: mixtures are for sft so far; give one data.path of pairs")
        if pairs and self.eval.metrics:
            raise ValueError(
                f"eval.metrics with objective={objective}: a preference run reports its reward accuracy on the eval pairs "
                "(eval_rewards/accuracy); remove eval.metrics"
            )
        return self

    def to_yaml(self) -> str:
        d = self.model_dump(mode="json")
        return yaml.safe_dump({k: d[k] for k in _top_order()}, sort_keys=False, allow_unicode=True)


Recipe = _with_knobs(_Recipe, "")


def _top_order() -> list[str]:
    """The recipe's top-level keys as a reader looks for them: the model, the card, the knobs, the rest."""
    first = ["model", "gpu", *knob_fields("")]
    return first + [k for k in Recipe.model_fields if k not in first]


def get_key(recipe: BaseModel, key: str) -> Any:
    """`get_key(recipe, "data.max_seq_len")`."""
    node: Any = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def set_key(recipe: BaseModel, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node: Any = recipe
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, value)


# --- loading, overrides, errors --------------------------------------------------------------------


def _fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


_TYPE_TAGS = {"int", "float", "str", "bool", "list[str]", "dict[str,str]", "EarlyStopping"}


def _describe(err: dict, raw: dict) -> str:
    loc = ".".join(
        str(x) for x in err["loc"] if str(x) not in _TYPE_TAGS and not str(x).startswith(("function-", "literal[", "constrained-"))
    )
    kind = err["type"]
    if kind == "extra_forbidden":
        parent: Any = Recipe
        for part in err["loc"][:-1]:
            ann = parent.model_fields.get(str(part)) if isinstance(parent, type) and issubclass(parent, BaseModel) else None
            parent = _submodel(ann.annotation) if ann else None
        names = _fields(parent) if parent else []
        hint = did_you_mean(str(err["loc"][-1]), names, n=1, cutoff=0.5) if names else ""
        return f"{loc}: unknown key" + (f"; {hint}" if hint else f" (known: {', '.join(names)})")
    if kind == "missing":
        return f"{loc}: required, but missing"
    value = err.get("input")
    msg = err["msg"].replace("Value error, ", "")
    if kind == "literal_error":
        msg = msg.replace("Input should be", "must be")
    if not loc:  # a rule across keys (a model validator): its message names them
        return msg
    if kind == "greater_than":
        msg += f": use a positive {loc}, or remove it for the default"
    return f"{loc}={_quote(value)}: {msg[0].lower() + msg[1:]}" if value is not None and not isinstance(value, dict) else f"{loc}: {msg}"


def _quote(value: Any, limit: int = 60) -> str:
    """A value as an error quotes it, cut to `limit` characters. Lists are written piece by piece up
    to the limit: the repr of nested YAML aliases would take exponential time and memory."""
    parts: list[str] = []
    size = 0

    def emit(text: str) -> None:
        nonlocal size
        parts.append(text)
        size += len(text)

    def walk(v: Any) -> None:
        if isinstance(v, list):
            emit("[")
            for i, x in enumerate(v):
                if size > limit:
                    break
                emit(", " if i else "")
                walk(x)
            emit("]")
        else:
            emit("{...}" if isinstance(v, dict) else repr(v)[: limit + 1])

    walk(value)
    text = "".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _dedupe(messages: list[str]) -> list[str]:
    # A union type (int | "auto") reports one error per member; keep one line per field.
    seen, out = set(), []
    for m in messages:
        key = m.split(":", 1)[0].split("=", 1)[0]
        if key not in seen:
            seen.add(key)
            out.append(m)
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Dotted `key=value` overrides (values parsed as YAML scalars: 2, 1e-4, true, null, [a, b])."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} is not key=value (e.g. train.epochs=2)")
            continue
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = parsed
    if problems:
        raise HfgpuError("; ".join(problems))
    return raw


def validate_recipe(raw: Any, source: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise HfgpuError(f"{source} must be a YAML mapping of keys to values (model:, data:, train: …), not {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        problems = _dedupe([_describe(err, raw) for err in e.errors()])
        raise HfgpuError(f"{source}: " + "; ".join(problems)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str) and key in seen:
            raise HfgpuError(
                f"key {key[:60]!r} appears twice (lines {seen[key]} and {key_node.start_mark.line + 1}): keep one, merging what each holds"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)

MAX_NODES = 100_000  # a recipe is a few hundred values; YAML aliases nesting beyond this are a "billion laughs"


def _check_size(raw: Any, source: str) -> None:
    stack, seen = [raw], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise HfgpuError(
                f"{source} expands to more than {MAX_NODES:,} values (YAML anchors and aliases nested inside each other?): "
                f"write the values out"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    p = Path(resolve_path(str(path)))
    if not p.is_file():
        raise HfgpuError(f"recipe {str(path)!r} not found: pass the path of a YAML recipe (see recipes/)")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except HfgpuError as e:
        raise HfgpuError(f"recipe {str(path)!r}: {e}") from None
    except UnicodeDecodeError:
        raise HfgpuError(f"recipe {str(path)!r} is not UTF-8 text: save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise HfgpuError(f"recipe {str(path)!r} is not valid YAML{where}: fix the file") from None
    _check_size(raw, f"recipe {str(path)!r}")
    raw = apply_overrides(raw if isinstance(raw, dict) else {}, overrides or []) if isinstance(raw, dict) or not raw else raw
    return validate_recipe(raw, str(path))


def recipe_help() -> str:
    """Every recipe key with its default and description, section by section (`python -m hfgpu.finetune --help`)."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str, depth: int) -> None:
        for name in _top_order() if model is Recipe else model.model_fields:
            f = model.model_fields[name]
            sub = _submodel(f.annotation)
            key = f"{prefix}{name}"
            if sub is not None and name != "early_stopping":
                lines.append(f"{'  ' * depth}{key}:  {f.description or ''}".rstrip())
                walk(sub, key + ".", depth + 1)
                continue
            default = (
                "required"
                if f.is_required()
                else "default "
                + (_quote(f.get_default(call_default_factory=True)) if f.default is not None or f.default_factory else "null")
            )
            lines.append(f"{'  ' * depth}{key} ({default}): {f.description or ''}".rstrip())

    walk(Recipe, "", 0)
    return "\n".join(lines)
