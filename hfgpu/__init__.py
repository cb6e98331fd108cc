"""hfgpu: fine-tune Hugging Face language models on the NVIDIA card you own.

    >>> import hfgpu
    >>> p = hfgpu.plan("Qwen/Qwen2.5-1.5B", "RTX 4090")
    >>> print(p)            # a table: every knob with its reason, the memory breakdown
    >>> p.to_dict()         # the same as JSON-ready data

`import hfgpu` and `hfgpu.plan` load neither bitsandbytes nor peft (nor, once a model's inventory
is cached, torch or transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "plan": "hfgpu.planner",
    "plan_or_closest": "hfgpu.planner",
    "Plan": "hfgpu.planner",
    "GPU": "hfgpu.gpus",
    "get_gpu": "hfgpu.gpus",
    "model_spec": "hfgpu.models",
    "ModelSpec": "hfgpu.models",
    "MemoryBreakdown": "hfgpu.memory",
    "HfgpuError": "hfgpu.errors",
    "DoesNotFit": "hfgpu.errors",
    "finetune": "hfgpu.finetune",
    "RunResult": "hfgpu.finetune",
    "load_recipe": "hfgpu.recipe",
    "Recipe": "hfgpu.recipe",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from hfgpu.errors import DoesNotFit, HfgpuError
    from hfgpu.finetune import RunResult, finetune
    from hfgpu.gpus import GPU, get_gpu
    from hfgpu.memory import MemoryBreakdown
    from hfgpu.models import ModelSpec, model_spec
    from hfgpu.planner import Plan, plan, plan_or_closest
    from hfgpu.recipe import Recipe, load_recipe


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hfgpu' has no attribute {name!r}")
