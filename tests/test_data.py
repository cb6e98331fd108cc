"""Data formats, label masks (decoded), packing without cross-example attention, caching, bad data."""


import pytest
import torch

from hfgpu.data import IGNORE, collate, load_rows, pack, padding_fraction, prepare_data, tokenize
from hfgpu.errors import HfgpuError
from hfgpu.modeling import load_tokenizer
from hfgpu.recipe import DataConfig
from conftest import DEMO, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(DEMO / "model"))


def learned_text(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE])


def one(tok, tmp_path, rows, **cfg):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    c = DataConfig(path=str(path), **cfg)
    ds, stats, _ = tokenize(load_rows(str(path)), c, tok, 128, "test")
    return ds, stats


def test_alpaca_learns_only_the_output(tok, tmp_path):
    ds, _ = one(tok, tmp_path, [{"instruction": "Name the capital city of Peru.", "input": "", "output": "Lima"}], format="alpaca")
    ex = ds[0]
    assert learned_text(tok, ex) == "Lima</s>"
    assert tok.decode(ex["input_ids"]).startswith("Below is an instruction") and "### Response:\nLima</s>" in tok.decode(ex["input_ids"])


def test_alpaca_with_input_and_renamed_columns(tok, tmp_path):
    ds, _ = one(tok, tmp_path, [{"q": "Capital?", "ctx": "Peru", "a": "Lima"}], format="alpaca", columns={"instruction": "q", "input": "ctx", "output": "a"})
    text = tok.decode(ds[0]["input_ids"])
    assert "### Input:\nPeru" in text and learned_text(tok, ds[0]) == "Lima</s>"


def test_prompt_completion_and_train_on_prompt(tok, tmp_path):
    rows = [{"prompt": "Capital of Peru: ", "completion": "Lima"}]
    ds, _ = one(tok, tmp_path, rows, format="prompt_completion")
    assert learned_text(tok, ds[0]) == "Lima</s>"
    ds, _ = one(tok, tmp_path, rows, format="prompt_completion", train_on_prompt=True)
    assert learned_text(tok, ds[0]) == "Capital of Peru: Lima</s>"


def test_text_learns_every_token(tok, tmp_path):
    ds, _ = one(tok, tmp_path, [{"text": "Paris is the capital of France."}], format="text")
    assert learned_text(tok, ds[0]) == "Paris is the capital of France.</s>" and ds[0]["labels"] == ds[0]["input_ids"]


def test_chat_learns_only_assistant_turns(tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
            {"role": "assistant", "content": "Lima"}, {"role": "user", "content": "And Chile?"}, {"role": "assistant", "content": "Santiago"}]
    ds, _ = one(tok, tmp_path, [{"messages": msgs}], format="chat")
    learned = learned_text(tok, ds[0])
    assert learned == "Lima</s>Santiago</s>"  # up to and including the end of turn, not the "\n" the template prints after it
    assert "<|user|>" in tok.decode(ds[0]["input_ids"])


def test_chat_errors(tok, tmp_path):
    with pytest.raises(HfgpuError, match="unknown role 'robot'"):
        one(tok, tmp_path, [{"messages": [{"role": "robot", "content": "hi"}]}], format="chat")
    plain = load_tokenizer(str(DEMO / "model"))
    plain.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(HfgpuError, match="needs a chat template"):
        tokenize(load_rows(str(path)), DataConfig(path=str(path), format="chat"), plain, 64, "test")


def test_missing_columns_name_the_fix(tok, tmp_path):
    with pytest.raises(HfgpuError, match="no column 'output'.*set data.columns.output"):
        one(tok, tmp_path, [{"instruction": "x", "answer": "y"}], format="alpaca")


def test_too_long_truncate_or_drop(tok, tmp_path):
    rows = [{"text": "word " * 200}, {"text": "short"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    ds, stats, _ = tokenize(load_rows(str(path)), DataConfig(path=str(path), format="text"), tok, 32, "t")
    assert stats["too_long"] == 1 and stats["dropped"] == 0 and max(ds["length"]) == 32
    ds, stats, _ = tokenize(load_rows(str(path)), DataConfig(path=str(path), format="text", too_long="drop"), tok, 32, "t")
    assert stats["dropped"] == 1 and len(ds) == 1


def test_file_types_and_bad_sources(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello\nworld\n")
    assert len(load_rows(str(tmp_path / "a.csv"))) == 2
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert load_rows(str(tmp_path / "a.txt")).column_names == ["text"]
    import datasets

    datasets.Dataset.from_dict({"text": ["x", "y", "z"]}).to_parquet(str(tmp_path / "a.parquet"))
    assert len(load_rows(str(tmp_path / "a.parquet"))) == 3
    with pytest.raises(HfgpuError, match="not found"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(HfgpuError, match="no rows|could not load"):
        load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(HfgpuError, match="extension '.xml'"):
        load_rows(str(tmp_path / "x.xml"))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir, tok, tmp_path, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    model.config.use_cache = False
    rows = [{"instruction": f"Name the capital city of {c}.", "input": "", "output": a} for c, a in [("Peru", "Lima"), ("Fiji", "Suva"), ("Mali", "Bamako")]]
    ds, _ = one(tok, tmp_path, rows, format="alpaca")
    packed = pack(ds, 512)
    assert len(packed) == 1 and packed[0]["position_ids"].count(0) == 3
    batch = collate([packed[0]], pad_id=tok.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for ex in ds:
            alone = model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0]
            n = len(ex["input_ids"])
            torch.testing.assert_close(logits[start : start + n], alone, atol=1e-5, rtol=1e-4)
            start += n
    # the first token of each later example is never a target of the previous one
    starts = [i for i, p in enumerate(packed[0]["position_ids"]) if p == 0]
    assert all(packed[0]["labels"][i] == IGNORE for i in starts)


def test_packing_reduces_padding_on_variable_lengths(tok, tmp_path):
    import random

    random.seed(0)
    path = write_jsonl(tmp_path / "var.jsonl", [{"text": " ".join(["capital"] * random.randint(2, 120))} for _ in range(64)])
    cfg = DataConfig(path=str(path), format="text", packing=True)
    prepared = prepare_data(cfg, tok, 256, 8)
    s = prepared.stats
    assert s["sequences"] < s["examples"] and s["padding_after"] < s["padding_before"]
    assert padding_fraction([4, 2], 2) == 0.25


def test_second_tokenization_uses_the_datasets_cache(tok, tmp_path):
    path = write_jsonl(tmp_path / "cache.jsonl", [{"text": f"example number {i}"} for i in range(50)])
    rows = load_rows(str(path))
    cfg = DataConfig(path=str(path), format="text")
    first, _, _ = tokenize(rows, cfg, tok, 64, "t")
    files = {f["filename"] for f in first.cache_files}
    second, _, _ = tokenize(load_rows(str(path)), cfg, load_tokenizer(str(DEMO / "model")), 64, "t")
    assert first["input_ids"] == second["input_ids"]
    # map() results are fingerprinted by data + function + tokenizer: the second run reads the same cache file
    assert files and files == {f["filename"] for f in second.cache_files}
    third, _, _ = tokenize(load_rows(str(path)), cfg, tok, 32, "t")  # other settings: a new cache file
    assert {f["filename"] for f in third.cache_files} != files
