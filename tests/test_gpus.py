import csv

import pytest
from conftest import ROOT

from hfgpu.errors import HfgpuError
from hfgpu.gpus import GPU, catalog, detect, get_gpu


def test_catalog_has_every_reference_card_with_facts_and_sources():
    rows = list(csv.DictReader((ROOT / "hfgpu/resources/gpus.csv").open()))
    names = [g.name for g in catalog()]
    assert names == [r["name"] for r in rows] and len(names) == 53
    g = get_gpu("RTX 4090")
    assert (g.vram_gb, g.compute_capability, g.bf16_supported, g.msrp_usd) == (24, (8, 9), True, 1599)
    assert g.tensor_tflops == 165.2 and g.bandwidth_gbps == 1008 and "wiki-list" in g.source
    assert all(c.source for c in catalog())


@pytest.mark.parametrize("name", ["4090", "rtx4090", "RTX 4090", "GeForce RTX 4090", "geforce rtx-4090", " NVIDIA GeForce RTX 4090 "])
def test_forgiving_names(name):
    assert get_gpu(name).name == "GeForce RTX 4090"


@pytest.mark.parametrize(
    "name,expected",
    [
        ("1080ti", "GeForce GTX 1080 Ti"),
        ("GTX 1080", "GeForce GTX 1080"),
        ("3060 12GB", "GeForce RTX 3060 12GB"),
        ("rtx 3060 8gb", "GeForce RTX 3060 8GB"),
        ("2080 Ti", "GeForce RTX 2080 Ti"),
        ("3060 ti", "GeForce RTX 3060 Ti"),
        ("T4", "NVIDIA T4"),
        ("h100", "NVIDIA H100 80GB (SXM5)"),
        ("titan xp", "NVIDIA TITAN Xp"),
    ],
)
def test_names_and_aliases(name, expected):
    g = get_gpu(name)
    assert g.name == expected and g.note == ""


@pytest.mark.parametrize(
    "name,default,other",
    [("3060", "GeForce RTX 3060 12GB", "8GB"), ("1060", "GeForce GTX 1060 6GB", "3GB"), ("3080", "GeForce RTX 3080 10GB", "12GB")],
)
def test_ambiguous_names_pick_the_documented_default_and_say_so(name, default, other):
    g = get_gpu(name)
    assert g.name == default
    assert "ambiguous" in g.note and other in g.note


def test_unknown_card_names_three_closest():
    with pytest.raises(HfgpuError) as e:
        get_gpu("RTX 4095")
    msg = str(e.value)
    assert "unknown GPU 'RTX 4095'" in msg and msg.count("'GeForce") == 3 and "\n" not in msg


def test_custom_cards():
    g = get_gpu("12GB")
    assert g.vram_gb == 12 and g.compute_capability is None
    two = get_gpu("2x RTX 3090")
    assert two.count == 2 and two.name == "GeForce RTX 3090" and "per process" in two.note
    mine = GPU(name="my card", vram_gb=10, compute_capability=(8, 6))
    assert get_gpu(mine) is mine


def test_auto_uses_torch_cuda_or_says_there_is_none():
    with pytest.raises(HfgpuError, match="no CUDA device"):
        detect(probe=lambda: None)
    g = detect(probe=lambda: ("NVIDIA GeForce RTX 3090", 25_438_126_080, (8, 6)))
    assert g.name == "GeForce RTX 3090" and g.vram_gb == pytest.approx(23.69, abs=0.01)
    odd = detect(probe=lambda: ("NVIDIA RTX A6000", 51_527_024_640, (8, 6)))
    assert odd.compute_capability == (8, 6) and odd.bf16_supported and "not in the catalog" in odd.note
