"""GGUF export's time and memory on a full-depth model shape with random weights (hfgpu.export.write_gguf).

    python benchmarks/export.py [--model meta-llama/Llama-3.2-1B] [--quant q8_0]

Prints the export time and the process's peak RSS beside the loaded model's bytes and the largest tensor's, and
what the export added on top of the loaded model (the target: about one tensor's conversion at a time, never the
model twice).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="meta-llama/Llama-3.2-1B")
    parser.add_argument("--quant", default="q8_0")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfgpu.export import write_gguf
    from hfgpu.models import model_spec, pretrained_config

    config = pretrained_config(model_spec(args.model).config)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "hfgpu/resources/demo/model")  # any byte-level BPE: tensors dominate
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    largest = max(p.numel() for p in model.state_dict().values())
    before = current_rss()
    peak, done = [before], threading.Event()

    def sample() -> None:  # the peak during the export itself (ru_maxrss would include building the model)
        while not done.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = write_gguf(model, tokenizer, Path(tmp) / "m.gguf", quant=args.quant, say=lambda *a: None)
        size = out.bytes
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak = peak[0]
    print(f"{args.model} (random bf16 weights), {args.quant}: {seconds:.1f} s, file {size / 2**30:.2f} GiB")
    print(f"loaded model {model_bytes / 2**30:.2f} GiB; largest tensor {largest / 1e6:.0f} M values ({largest * 2 / 2**30:.2f} GiB bf16)")
    print(f"RSS before export {before / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB: the export added {(peak - before) / 2**30:.2f} GiB")
    added = (peak - before) / (largest * 4)
    print(f"added / largest tensor in fp32: {added:.2f}   (the model twice would be {model_bytes / (largest * 4):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
