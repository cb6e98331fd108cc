"""The installed package's own folder, for the files it ships (resources/, metrics/).

From `__file__`, not `importlib.resources.files("hfgpu")`: run from a folder that holds a directory
named `hfgpu` (a checkout, an output folder), Python merges that directory into a namespace package
and `files()` returns a multiplexed path that cannot join several parts."""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
