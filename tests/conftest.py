import os
import sys
import tempfile
import warnings
from pathlib import Path

# Tests never download; the spec cache goes to a fresh folder so counts are really computed.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HFGPU_CACHE", tempfile.mkdtemp(prefix="hfgpu-test-cache-"))
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hfgpu-test-hf-"))
warnings.filterwarnings("ignore", category=FutureWarning)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_llama(**overrides):
    """A small Llama config (2 layers, hidden 64 unless overridden)."""
    from transformers import LlamaConfig

    base = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)
    return LlamaConfig(**{**base, **overrides})
