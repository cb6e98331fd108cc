"""Bytes as hfgpu prints them: one GiB (2**30 bytes; an "8 GB" card has 8 GiB), one formatter."""

GIB = 1024**3


def gib(n: float, digits: int = 1) -> str:
    """`n` bytes as "7.6 GiB"."""
    return f"{n / GIB:.{digits}f} GiB"
