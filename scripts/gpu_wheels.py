"""Download the wheels a bare CUDA machine lacks for `scripts/gpu_check.sh`, where the package registries are reachable.

    python scripts/gpu_wheels.py            # (make gpu-wheels) into .gpu-wheels/, prints what and how much
    python scripts/gpu_wheels.py --list     # only the name==version list

The GPU machine lent to sessions is bare each time and reaches no registry: python3 3.12 with torch (a CUDA build),
transformers, peft, accelerate, pyarrow and pandas, but no bitsandbytes, datasets, pydantic or gguf, and at most
64 MiB travels with the work tree. So the check brings its own: the runtime closure of hfgpu's dependencies as this
environment has them (the transformers and peft the memory model was fitted on, constraints.txt), plus pytest, as
cp312 manylinux x86_64 wheels, installed there with `--no-index --no-deps --target` in front of the image's
packages. Left out: torch and its CUDA libraries (the image's build is the one that matches its driver), numpy,
pandas and pyarrow (the image's match its torch), matplotlib (loss.png is skipped without it), gguf (export is not
checked there), and the Hub CLI's own dependencies. bitsandbytes' wheel carries a kernel library for every CUDA and
ROCm release (42 MB): it is repacked with the CUDA 13 libraries (the image's torch is cu130) and the CPU one, 7 MB.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".gpu-wheels"
LIMIT_MIB = 64  # what travels with the tree to the GPU machine, wheels included
ROOTS = ("transformers", "peft", "accelerate", "datasets", "bitsandbytes", "evaluate", "huggingface_hub", "pydantic", "pyyaml", "rich")
EXTRA = ("pytest",)  # tests/gpu runs under it
# on the image already, or not needed by the check (see the docstring)
SKIP = {"torch", "numpy", "pandas", "pyarrow", "matplotlib", "gguf", "triton", "setuptools", "pip", "wheel"}
SKIP |= {"typer", "click", "shellingham", "annotated-doc"}  # huggingface_hub's CLI
BNB_KEEP = re.compile(r"bitsandbytes/libbitsandbytes_(cuda13\d|cpu)\.so$")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names=(*ROOTS, *EXTRA), skip=frozenset(SKIP), missing_ok: bool = False) -> dict[str, str]:
    """name → version of every installed distribution `names` need here (markers for this platform, no extras), the
    `skip` ones (and CUDA's nvidia-* wheels) and what only they need left out. A name not installed stops the script,
    unless `missing_ok` (an optional requirement)."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    stack = list(names)
    while stack:
        name = _norm(stack.pop())
        if name in seen or name in skip or name.startswith("nvidia-"):
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            if missing_ok:
                continue
            raise SystemExit(f"{name} is not installed here: run `make install` first (the wheels are this environment's versions)")
        seen[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return dict(sorted(seen.items()))


def download(pins: list[str], out: Path) -> None:
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    cmd += ["--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", *platforms, "-d", str(out), *pins]
    subprocess.run(cmd, check=True)


def slim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the wheel without the kernel libraries of other CUDA and ROCm releases (RECORD rewritten to match)."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {i.filename for i in src.infolist() if i.filename.startswith("bitsandbytes/lib") and not BNB_KEEP.search(i.filename)}
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in src.infolist():
            if info.filename in dropped or info.filename == record_name:
                continue
            data = src.read(info)
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{info.filename},sha256={digest},{len(data)}")
        dst.writestr(record_name, "\n".join(rows + [f"{record_name},,"]) + "\n")
    tmp.replace(wheel)


def repack_installed(pins: list[str], out: Path) -> None:
    """Each distribution as this environment has it installed, zipped back into a py3-none-any wheel (its files as
    RECORD lists them, inside site-packages): wheels for this very interpreter, made without a registry. The plumbing
    test (tests/test_gpu_check.py) uses them; the GPU machine needs the cp312 downloads."""
    for pin in pins:
        name, version = pin.split("==")
        dist = md.distribution(name)
        base = Path(dist.locate_file(""))
        wheel = out / f"{_norm(name).replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
            for f in dist.files or []:
                path = base / f
                if ".." in f.parts or "__pycache__" in f.parts or not path.is_file():
                    continue  # console scripts outside site-packages, byte code
                z.write(path, f.as_posix())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the name==version list and stop")
    parser.add_argument("--out", default=str(OUT), help="where the wheels go (default .gpu-wheels/, ignored by git)")
    parser.add_argument("--from-installed", action="store_true", help="repack this environment's installed packages (no download)")
    args = parser.parse_args()
    pins = [f"{n}=={v}" for n, v in closure().items()]
    if args.list:
        print("\n".join(pins))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    if args.from_installed:
        repack_installed(pins, out)
    else:
        download(pins, out)
        for wheel in out.glob("bitsandbytes-*.whl"):
            slim_bitsandbytes(wheel)
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((ROOT / f.decode()).stat().st_size for f in tracked if f and (ROOT / f.decode()).is_file())
    for w in sorted(wheels, key=lambda w: -w.stat().st_size)[:5]:
        print(f"  {w.stat().st_size / 2**20:5.1f} MiB  {w.name}")
    total = (size + tree) / 2**20
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {out}; with the tree ({tree / 2**20:.1f} MiB): {total:.1f} MiB of {LIMIT_MIB}")
    if total > LIMIT_MIB and not args.from_installed:  # repacked wheels stay on this machine
        print(f"over the {LIMIT_MIB} MiB that travel to the GPU machine: trim the list (SKIP) before running the check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
