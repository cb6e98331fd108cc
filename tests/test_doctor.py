"""hfgpu doctor: the logic on faked system probes (what torch.cuda & co. would report), and the real probe."""

import json

from hfgpu.doctor import Device, SystemProbe, diagnose, wheel_runs_on

GIB = 1024**3
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU128 = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def probe(devices, arch=CU128, bnb="0.50.2", fa=None, logged_in=True, cuda="12.8"):
    return SystemProbe(
        torch_version="2.13.0",
        cuda_version=cuda,
        arch_list=arch,
        devices=devices,
        bitsandbytes=bnb,
        flash_attn=fa,
        accelerate_config=None,
        hub_logged_in=logged_in,
    )


def by_name(report):
    return {c.name: c for c in report.checks}


def test_gtx_1080_on_a_wheel_without_pascal_kernels_says_what_to_install():
    r = diagnose(probe([Device("NVIDIA GeForce GTX 1080", 8 * GIB, 7 * GIB, (6, 1))]))
    c = by_name(r)["gpu 0 kernels"]
    assert c.status == "fail" and not r.ok
    assert "no sm_6x kernels" in c.detail and "only the CUDA 12.6 builds of torch ≤ 2.14" in c.detail
    assert c.fix == "pip install 'torch<=2.14' --index-url https://download.pytorch.org/whl/cu126"
    checks = by_name(r)
    assert "NF4" in checks["gpu 0 bitsandbytes"].detail and "LLM.int8" not in checks["gpu 0 bitsandbytes"].detail
    assert checks["gpu 0 bf16"].status == "warn" and "fp32" in checks["gpu 0 bf16"].detail
    assert "needs cc ≥ 8.0" in checks["gpu 0 flash-attn"].detail


def test_gtx_1080_on_a_cu126_wheel_is_fine():
    r = diagnose(probe([Device("NVIDIA GeForce GTX 1080", 8 * GIB, 7 * GIB, (6, 1))], arch=CU126, cuda="12.6"))
    assert r.ok and by_name(r)["gpu 0 kernels"].status == "ok"  # sm_60 cubins run on sm_61


def test_rtx_4090_is_fine_and_lists_everything():
    r = diagnose(probe([Device("NVIDIA GeForce RTX 4090", 24 * GIB, 23 * GIB, (8, 9))], fa="2.8.3"))
    checks = by_name(r)
    assert r.ok and checks["gpu 0 bf16"].status == "ok" and "flash-attn 2.8.3" in checks["gpu 0 flash-attn"].detail
    assert "LLM.int8" in checks["gpu 0 bitsandbytes"].detail and "23.0 GiB free" in checks["gpu 0"].detail


def test_turing_gets_fp16_and_no_flash_attention():
    checks = by_name(diagnose(probe([Device("NVIDIA GeForce RTX 2080 Ti", 11 * GIB, 10 * GIB, (7, 5))])))
    assert "fp16" in checks["gpu 0 bf16"].detail and "emulation" in checks["gpu 0 bf16"].detail
    assert "LLM.int8" in checks["gpu 0 bitsandbytes"].detail


def test_no_gpu_missing_bitsandbytes_and_no_login():
    r = diagnose(probe([], arch=[], cuda=None, bnb=None, logged_in=False))
    checks = by_name(r)
    assert checks["gpu"].status == "warn" and checks["bitsandbytes"].status == "warn" and checks["hub login"].status == "warn"
    assert r.ok  # warnings only: the CPU demo still runs


def test_wheel_compatibility_rules():
    assert wheel_runs_on(["sm_60"], (6, 1)) and not wheel_runs_on(["sm_70"], (6, 1))
    assert wheel_runs_on(["sm_80", "compute_90"], (12, 0)) and not wheel_runs_on(["sm_80", "sm_90"], (12, 0))


def test_real_probe_and_json_never_show_a_token(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_sentinel_doctor_token")
    from hfgpu.cli import main

    assert main(["doctor", "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["system"]["hub_logged_in"] is True and "hf_sentinel_doctor_token" not in out
    import torch

    assert data["system"]["torch_version"] == torch.__version__  # the probe reads the torch that is installed
