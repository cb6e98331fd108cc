"""How fast planning is, measured side by side in one run (these machines are noisy: read the ratios).

Targets (issue "hfgpu.plan"):
- hfgpu.plan warm (the process has planned once): < 0.5 s for Llama-3.1-8B, < 1 s for a 70B-class config;
- `hfgpu plan … --json` wall time ≤ 1.5 × `python -c "import torch, transformers"`; `import hfgpu` well under it.

    python benchmarks/plan_speed.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_70B_CLASS = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


def wall(cmd: list[str], env: dict, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=ROOT, check=False, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    cache = tempfile.mkdtemp(prefix="hfgpu-bench-")
    env = {**os.environ, "HFGPU_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    os.environ.update(HFGPU_CACHE=cache, HF_HUB_OFFLINE="1")
    big = Path(cache) / "llama-70b-class"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(LLAMA_70B_CLASS))

    import hfgpu

    t = time.perf_counter()
    hfgpu.plan_or_closest("meta-llama/Llama-3.1-8B", "RTX 4090")
    cold_8b = time.perf_counter() - t
    t = time.perf_counter()
    hfgpu.plan_or_closest(str(big), "H100")
    cold_70b = time.perf_counter() - t
    warm = {}
    for name, model, gpu in (("Llama-3.1-8B", "meta-llama/Llama-3.1-8B", "RTX 4090"), ("70B-class", str(big), "H100")):
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            hfgpu.plan_or_closest(model, gpu)
            runs.append(time.perf_counter() - t)
        warm[name] = statistics.median(runs)

    t = time.perf_counter()
    verified = hfgpu.plan_or_closest("meta-llama/Llama-3.1-8B", "RTX 4090")
    from hfgpu.simulate import simulate

    simulate(verified.spec.config, verified.setup(), verified.spec)
    verify_8b = time.perf_counter() - t

    py = sys.executable
    baseline = wall([py, "-c", "import torch, transformers"], env)
    import_hfgpu = wall([py, "-c", "import hfgpu"], env)
    cli_cached = wall([py, "-m", "hfgpu", "plan", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--json"], env)
    cold_env = {**env, "HFGPU_CACHE": tempfile.mkdtemp(prefix="hfgpu-bench-cold-")}
    cli_cold = []
    for _ in range(3):
        cold_env["HFGPU_CACHE"] = tempfile.mkdtemp(prefix="hfgpu-bench-cold-")
        cli_cold.append(wall([py, "-m", "hfgpu", "plan", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--json"], cold_env, repeat=1))
    cli_cold_s = statistics.median(cli_cold)
    # a model outside the offline catalog: its first plan counts it on the meta device (torch + transformers)
    local = Path(cache) / "local-8b"
    local.mkdir()
    config = json.loads((ROOT / "hfgpu/resources/configs/meta-llama__Llama-3.1-8B.json").read_text())
    local_cold = []
    for i in range(3):
        (local / "config.json").write_text(json.dumps({**config, "bench_nonce": i}))
        local_cold.append(wall([py, "-m", "hfgpu", "plan", str(local), "--gpu", "RTX 4090", "--json"], env, repeat=1))
    local_cold_s = statistics.median(local_cold)

    print(f"plan() first call, Llama-3.1-8B (shipped inventory):        {cold_8b:.3f} s")
    print(f"plan() first call, 70B-class (meta device, imports torch):   {cold_70b:.3f} s")
    print(f"plan() warm, Llama-3.1-8B:  {warm['Llama-3.1-8B']:.4f} s   (target < 0.5 s)")
    print(f"plan() warm, 70B-class:     {warm['70B-class']:.4f} s   (target < 1 s)")
    print(f"--verify, Llama-3.1-8B (one step on fake tensors): {verify_8b:.1f} s   (target < 20 s)")
    print(f"python -c 'import torch, transformers':      {baseline:.2f} s   (1.00)")
    print(f"python -c 'import hfgpu':                    {import_hfgpu:.2f} s   ({import_hfgpu / baseline:.2f})")
    print(f"hfgpu plan … --json, inventory cached:       {cli_cached:.2f} s   ({cli_cached / baseline:.2f}; target ≤ 1.5)")
    print(f"hfgpu plan … --json, catalog, empty cache:   {cli_cold_s:.2f} s   ({cli_cold_s / baseline:.2f}; target ≤ 1.5)")
    print(f"hfgpu plan ./local-8b --json, first time:    {local_cold_s:.2f} s   ({local_cold_s / baseline:.2f}; counts on the meta device)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
