"""Model specs: a model's shape and exact parameter inventory, from its config alone (never weights).

A spec comes from a Hub repo id, a local folder or config.json, a `PretrainedConfig`, or the offline
catalog in `resources/configs/` (real config.json files of popular models, so they plan with no
network and no token; Llama configs are gated on the Hub). Parameter counts are exact: the model is
built on the meta device and counted (`accelerate.init_empty_weights` would leave tied embeddings
untied and over-count). The inventory is cached in memory and on disk, keyed by a hash of the config
and the transformers version, so a warm `hfgpu plan` needs neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from hfgpu._fuzzy import did_you_mean
from hfgpu._package import PACKAGE
from hfgpu.errors import HfgpuError

INVENTORY_VERSION = 3  # bump when the inventory's fields or counting change: old cache files are then ignored (3: Conv1D counted)


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers that share a name suffix and shape, e.g. 32 × `q_proj` 4096→4096."""

    name: str  # the module name's last component: a LoRA target name
    in_features: int
    out_features: int
    count: int
    bias: bool

    @property
    def params(self) -> int:
        return self.count * (self.in_features * self.out_features + (self.out_features if self.bias else 0))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # "catalog", "local", "hub" or "config"
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_seq_len: int
    tie_word_embeddings: bool
    params_total: int  # unique parameters (a tied lm_head counts once)
    embedding_params: int  # input embeddings
    lm_head_params: int  # 0 when tied to the input embeddings
    linears: tuple[LinearGroup, ...]  # every nn.Linear (and transformers Conv1D, GPT-2's) except lm_head
    param_numels: tuple[tuple[int, int], ...]  # (numel, how many tensors): for per-tensor optimizer rules
    buffer_bytes: int = 0  # non-parameter tensors (rotary inv_freq …), at their config dtype
    num_experts: int = 0
    config: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def linear_params(self) -> int:
        """Parameters in Linear layers other than lm_head: what LoRA targets and bitsandbytes quantizes."""
        return sum(g.params for g in self.linears)

    @property
    def other_params(self) -> int:
        """Norms, biases of non-linear modules, expert tensors: everything not embedding/lm_head/Linear."""
        return self.params_total - self.embedding_params - self.lm_head_params - self.linear_params

    @property
    def linear_names(self) -> list[str]:
        return sorted({g.name for g in self.linears})

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


# --- locating a config ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def catalog_ids() -> dict[str, str]:
    """Offline catalog: lower-cased repo id (and bare model name) → file name in resources/configs/. A bare name
    without its release suffix names the model too when only one entry starts so: Llama-2-13b (-hf),
    TinyLlama-1.1B (-Chat-v1.0), Phi-3-mini-4k (-instruct), Mixtral-8x7B (-v0.1); `Llama-2` (two sizes) does not."""
    folder = PACKAGE.joinpath("resources/configs")
    ids: dict[str, str] = {}
    shorter: dict[str, set[str]] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            repo_id = entry.name[: -len(".json")].replace("__", "/")
            ids[repo_id.lower()] = entry.name
            ids.setdefault(repo_id.split("/")[-1].lower(), entry.name)
            parts = repo_id.split("/")[-1].lower().split("-")
            for n in range(2, len(parts)):  # at least two parts: "llama" or "qwen2.5" alone names nothing
                shorter.setdefault("-".join(parts[:n]), set()).add(entry.name)
    for name, files in shorter.items():
        if len(files) == 1:
            ids.setdefault(name, next(iter(files)))
    return ids


def catalog_models() -> list[str]:
    """The repo ids of the offline catalog, sorted."""
    return sorted({f[: -len(".json")].replace("__", "/") for f in catalog_ids().values()})


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HfgpuError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): fix the file or pass another model"
        ) from None
    except OSError as e:
        raise HfgpuError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise HfgpuError(f"{path} holds a JSON {type(data).__name__}, not a config object: pass a model's config.json")
    return data


def _hub_config(repo_id: str) -> dict:
    from hfgpu.online import cut_off, unreachable_reason

    no_network = cut_off()  # one short attempt: without network, the cache alone, at once (no retries)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, "config.json")
    except Exception as e:  # offline, gated, missing, network: all end the same way for the user
        reason = unreachable_reason() if no_network else type(e).__name__
        raise HfgpuError(
            f"model {repo_id!r} is not in hfgpu's offline catalog and its config.json could not be fetched ({reason}): "
            f"download it (`hf download {repo_id} config.json --local-dir ./{repo_id.split('/')[-1]}`) and pass that folder"
        ) from None
    return _read_json(Path(path))


def gguf_source(path: Any) -> tuple[str, dict]:
    """What transformers' from_pretrained takes for `path`: a .gguf file is its folder plus `gguf_file` (transformers
    reads its metadata as the config and dequantizes its tensors); anything else is itself."""
    text = str(path)
    if text.lower().endswith(".gguf"):
        p = Path(text).expanduser()
        return str(p.parent), {"gguf_file": p.name}
    return text, {}


def _gguf_config(text: str) -> dict:
    """A GGUF file's config, from its metadata (transformers' reader; tensors are not read), kept in the user cache
    under the file's path, size and modification time and the transformers version: reading it parses the whole
    vocabulary (~10 s for SmolLM2's 49k tokens), and plan, finetune, generate and export each ask for it."""
    file = Path(text).expanduser().resolve()
    stat = file.stat()
    tf_version = metadata.version("transformers")
    blob = f"{file}|{stat.st_size}|{stat.st_mtime_ns}|{tf_version}"
    path = cache_dir() / f"gguf-{hashlib.sha256(blob.encode()).hexdigest()[:32]}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        pass  # not cached yet, or a damaged cache file: read the GGUF
    d = _read_gguf_config(text)
    try:
        d = json.loads(json.dumps(d))  # as a config.json holds it (id2label's keys strings): the same dict cached or not
    except TypeError:
        return d  # a value JSON cannot hold: not cached
    _cache_write(path, d)
    return d


def _cache_write(path: Path, value) -> None:
    """`value` as JSON at `path` in the user cache, written whole or not at all; a read-only home only costs speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)
    except OSError:
        pass


def _gguf_type(text: str) -> str | None:
    """The file's general.type ("model", "adapter", …), from its header; None when it has none or cannot be read."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(Path(text).expanduser()), "r").fields.get("general.type")
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception:  # not a GGUF file, or the gguf package missing: transformers' reader says what is wrong
        return None


def _read_gguf_config(text: str) -> dict:
    from transformers import AutoConfig

    if _gguf_type(text) == "adapter":  # transformers would read it as a made-up default model of that architecture
        raise HfgpuError(
            f"{text!r} is a LoRA adapter (GGUF), not a model: plan or train on its base model (llama.cpp applies the adapter "
            "with llama-cli -m BASE.gguf --lora ADAPTER.gguf)"
        )
    folder, extra = gguf_source(text)
    try:
        config = AutoConfig.from_pretrained(folder, **extra)
    except Exception as e:  # the gguf package missing, an architecture transformers cannot read, a damaged file
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise HfgpuError(
            f"cannot read the GGUF file {text!r} as a model ({detail}): transformers loads GGUF llama, mistral, qwen2, "
            "qwen3, phi3, gemma2/3 and a few more; pass another file, or the original model's folder or Hub id"
        ) from None
    d = config.to_dict()
    d.setdefault("model_type", config.model_type)
    return d


def load_config(model: Any) -> tuple[str, str, dict]:
    """(display name, source, config dict) for a repo id, a folder, a config.json path, a PretrainedConfig or a config dict."""
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):
        d = model.to_dict()
        d.setdefault("model_type", model.model_type)
        return getattr(model, "name_or_path", "") or d["model_type"], "config", d
    if isinstance(model, dict) and isinstance(model.get("model_type"), str):  # a config.json's contents
        return model.get("_name_or_path") or model["model_type"], "config", dict(model)
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        shown = repr(model) if len(repr(model)) <= 80 else repr(model)[:77] + "..."
        raise HfgpuError(f"model {shown} is not a model: pass a Hub repo id, a folder with config.json, a PretrainedConfig or config dict")
    from hfgpu._package import resolve_path

    text = resolve_path(str(model).strip())  # hfgpu:… and package:… name files inside installed packages
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HfgpuError(f"folder {text!r} has no config.json: pass a model folder or the config.json path")
        return text, "local", _read_json(path / "config.json")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return text, "gguf", _gguf_config(text)
    if path.is_file():
        return text, "local", _read_json(path)
    entry = catalog_ids().get(text.lower())
    if entry is not None:
        repo_id = entry[: -len(".json")].replace("__", "/")
        raw = PACKAGE.joinpath("resources/configs", entry).read_text(encoding="utf-8")
        return repo_id, "catalog", json.loads(raw)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise HfgpuError(f"model path {text!r} not found: pass an existing folder with config.json, or a Hub repo id (owner/name)")
    if text.count("/") == 1:
        return text, "hub", _hub_config(text)
    raise HfgpuError(
        f"model {text!r} is neither a local folder nor a Hub repo id (owner/name): "
        f"{did_you_mean(text, catalog_models())} (offline catalog: `hfgpu fit --help` lists it)"
    )


# --- counting -------------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("HFGPU_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hfgpu")
    return Path(base) / "specs"


def _config_key(config: dict, versioned: bool = True) -> str:
    """A hash of the config (and, for the user cache, of the transformers version that counted it)."""
    tf_version = "any"
    if versioned:
        try:
            tf_version = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            tf_version = "none"
    blob = json.dumps(config, sort_keys=True, default=str) + f"|{tf_version}|{INVENTORY_VERSION}"
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@lru_cache(maxsize=1)
def shipped_inventories() -> dict:
    """Inventories of the offline catalog, counted on the meta device by `build_shipped_inventories`
    (tests recount them with the installed transformers), so catalog plans never import torch."""
    try:
        return json.loads(PACKAGE.joinpath("resources/inventories.json").read_text())
    except FileNotFoundError:
        return {}


def build_shipped_inventories() -> dict:
    """Count every catalog model on the meta device; `python -m hfgpu.models` writes the result."""
    out = {}
    for repo_id in catalog_models():
        _, _, config = load_config(repo_id)
        key = _config_key(config, versioned=False)
        out[key] = json.loads(json.dumps(_count_on_meta(config)))  # as stored: lists, not tuples
    return out


def pretrained_config(config: dict):
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if not model_type:
        raise HfgpuError("config.json has no 'model_type': pass the config of a transformers causal LM")
    # a deep copy: transformers rewrites nested dicts (rope_scaling) in place, which would change our cache key
    rest = {k: v for k, v in json.loads(json.dumps(config)).items() if k != "model_type"}
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise HfgpuError(f"model_type {model_type!r} is not known to this transformers: upgrade transformers or pick another model")
    try:
        return AutoConfig.for_model(model_type, **rest)
    except Exception as e:  # transformers 5 validates configs (huggingface_hub strict dataclasses): sizes that cannot build
        cause = e.__cause__ or e
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
        raise HfgpuError(f"config.json of model_type {model_type!r} is not valid ({detail}): fix the config's sizes") from None


def _count_on_meta(config: dict) -> dict:
    """Build the model on the meta device (no memory, ~1 s for 8B) and take its inventory."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    cfg = pretrained_config(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except ValueError as e:
        raise HfgpuError(
            f"{config.get('model_type')!r} is not a causal language model transformers can build ({str(e).splitlines()[0][:120]})"
        ) from None
    except (TypeError, AttributeError, ZeroDivisionError) as e:
        raise HfgpuError(f"config.json does not describe a buildable model ({type(e).__name__}: {str(e)[:120]}): check its sizes") from None
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    from transformers.pytorch_utils import Conv1D

    groups: dict[tuple, int] = {}
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear):
            shape = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2's linear layers, weight stored (in, out): peft and bitsandbytes treat them as linear
            shape = tuple(module.weight.shape)
        else:
            continue
        key = (name.rsplit(".", 1)[-1], *shape, module.bias is not None)
        groups[key] = groups.get(key, 0) + 1
    numels: dict[int, int] = {}
    for p in model.parameters():  # parameters() yields a tied tensor once
        numels[p.numel()] = numels.get(p.numel(), 0) + 1
    return {
        "params_total": sum(n * c for n, c in numels.items()),
        "embedding_params": embed.weight.numel(),
        "lm_head_params": 0 if (head is None or tied) else head.weight.numel() + (head.bias.numel() if head.bias is not None else 0),
        "tie_word_embeddings": bool(tied),
        "linears": [list(k) + [c] for k, c in sorted(groups.items())],
        "param_numels": sorted(numels.items()),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
    }


_MEMO: dict[str, dict] = {}


def _inventory(config: dict) -> dict:
    key = _config_key(config)
    if key in _MEMO:
        return _MEMO[key]
    shipped = shipped_inventories().get(_config_key(config, versioned=False))
    if shipped is not None:
        _MEMO[key] = shipped
        return shipped
    path = cache_dir() / f"{key}.json"
    inv = None
    if path.is_file():
        try:
            inv = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            inv = None  # a damaged cache file is recomputed
    if inv is None:
        inv = _count_on_meta(config)
        _cache_write(path, inv)
    _MEMO[key] = inv
    return inv


def _text_config(config: dict) -> dict:
    # Multimodal configs nest the language model's config.
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def _require_int(cfg: dict, *names: str, default: int | None = None) -> int:
    for name in names:
        value = cfg.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise HfgpuError(f"config.json has {name}={value!r}: it must be a positive integer")
            return value
    if default is not None:
        return default
    raise HfgpuError(f"config.json has no {names[0]!r}: pass the config of a transformers causal LM")


def model_spec(model: Any) -> ModelSpec:
    """The spec of `model` (repo id, folder, config.json path or PretrainedConfig), with exact counts."""
    name, source, config = load_config(model)
    if not config.get("model_type"):
        raise HfgpuError(f"config of {name!r} has no 'model_type': pass the config.json of a transformers causal LM")
    cfg = _text_config(config)
    hidden = _require_int(cfg, "hidden_size", "n_embd", "d_model")
    heads = _require_int(cfg, "num_attention_heads", "n_head")
    inv = _inventory(config)
    return ModelSpec(
        name=name,
        source=source,
        model_type=config["model_type"],
        hidden_size=hidden,
        num_layers=_require_int(cfg, "num_hidden_layers", "n_layer"),
        num_heads=heads,
        num_kv_heads=_require_int(cfg, "num_key_value_heads", default=heads),
        head_dim=_require_int(cfg, "head_dim", default=max(1, hidden // heads)),
        intermediate_size=_require_int(cfg, "intermediate_size", "n_inner", default=4 * hidden),
        vocab_size=_require_int(cfg, "vocab_size"),
        max_seq_len=_require_int(cfg, "max_position_embeddings", "n_positions", default=2048),
        tie_word_embeddings=inv["tie_word_embeddings"],
        params_total=inv["params_total"],
        embedding_params=inv["embedding_params"],
        lm_head_params=inv["lm_head_params"],
        linears=tuple(LinearGroup(name=n, in_features=i, out_features=o, bias=b, count=c) for n, i, o, b, c in inv["linears"]),
        param_numels=tuple(tuple(x) for x in inv["param_numels"]),
        buffer_bytes=inv["buffer_bytes"],
        num_experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0),
        config=config,
    )


if __name__ == "__main__":
    target = Path(__file__).parent / "resources" / "inventories.json"
    target.write_text(json.dumps(build_shipped_inventories(), indent=0, sort_keys=True) + "\n")
    print(f"wrote {target}")
