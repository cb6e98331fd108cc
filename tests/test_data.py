"""Data formats, label masks (decoded), packing without cross-example attention, caching, bad data."""

import pytest
import torch
from conftest import DEMO, limit, write_jsonl

from hfgpu.data import IGNORE, collate, pack, padding_fraction, prepare_data, tokenize
from hfgpu.errors import HfgpuError
from hfgpu.modeling import load_tokenizer
from hfgpu.recipe import DataConfig
from hfgpu.sources import load_rows


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
    ds, _ = one(
        tok,
        tmp_path,
        [{"q": "Capital?", "ctx": "Peru", "a": "Lima"}],
        format="alpaca",
        columns={"instruction": "q", "input": "ctx", "output": "a"},
    )
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
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
        {"role": "user", "content": "And Chile?"},
        {"role": "assistant", "content": "Santiago"},
    ]
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
    rows = [
        {"instruction": f"Name the capital city of {c}.", "input": "", "output": a}
        for c, a in [("Peru", "Lima"), ("Fiji", "Suva"), ("Mali", "Bamako")]
    ]
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


# --- edge cases a real data file has ------------------------------------------------------------------


def test_prompt_completion_masks_and_eos_equal_trls(tok, tmp_path):
    """TRL's SFTTrainer (completion_only_loss) on the same rows: same tokens, same learned positions,
    and an EOS added only when the completion does not already end with it."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows = [
        {"prompt": "Capital of Peru:\n", "completion": "Lima"},
        {"prompt": "Capital of Fiji:\n", "completion": "Suva</s>"},
        {"prompt": "Say it twice:\n", "completion": "yes yes"},
    ]
    ours, _ = one(tok, tmp_path, rows, format="prompt_completion")
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(DEMO / "model"),
        args=SFTConfig(output_dir=str(tmp_path / "trl"), completion_only_loss=True, report_to=[], max_length=64, use_cpu=True),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    theirs = list(trainer.train_dataset)
    assert [ex["input_ids"] for ex in ours] == [ex["input_ids"] for ex in theirs]
    assert [ex["labels"] for ex in ours] == [ex["labels"] for ex in theirs]
    assert learned_text(tok, ours[1]) == "Suva</s>"  # one EOS, not two


def test_text_that_already_ends_with_eos_gets_no_second_one(tok, tmp_path):
    ds, _ = one(tok, tmp_path, [{"text": "Paris.</s>"}], format="text")
    assert ds[0]["input_ids"].count(tok.eos_token_id) == 1


def test_openai_style_content_parts_are_joined_text(tok, tmp_path):
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "Peru?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Lima"}]},
    ]
    ds, _ = one(tok, tmp_path, [{"messages": msgs}], format="chat")
    text = tok.decode(ds[0]["input_ids"])
    assert "Capital of Peru?" in text and "[{" not in text and learned_text(tok, ds[0]) == "Lima</s>"


def test_rows_that_do_not_match_the_format_are_dropped_with_their_reason(tok, tmp_path):
    good = [{"instruction": f"Capital of {c}?", "output": a} for c, a in [("Peru", "Lima"), ("Fiji", "Suva"), ("Mali", "Bamako")]]
    rows = good + [{"prompt": "Capital of Chile?", "completion": "Santiago"}, {"instruction": "Capital of Iraq?", "output": ["Baghdad"]}]
    ds, stats = one(tok, tmp_path, rows, format="alpaca")
    assert len(ds) == 3 and stats["dropped"] == 2
    assert stats["drop_reasons"] == {"missing 'instruction'": [4], "list-valued 'output'": [5]}
    assert all("['Baghdad']" not in tok.decode(ex["input_ids"]) for ex in ds)  # never a Python repr
    from hfgpu.data import describe_drops

    assert describe_drops(stats["drop_reasons"]) == "1 missing 'instruction' (row 4); 1 list-valued 'output' (row 5)"


def test_a_file_mostly_in_another_format_is_refused(tok, tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)] + [{"instruction": "x", "output": "y"}]
    with pytest.raises(HfgpuError, match=r"4 of 5 rows do not match format 'alpaca' \(4 missing 'instruction'.*check data.format"):
        one(tok, tmp_path, rows, format="alpaca")


def test_empty_completions_teach_nothing(tok, tmp_path):
    rows = [{"prompt": "q", "completion": ""}, {"prompt": "q", "completion": "  "}, {"prompt": "Capital of Peru?", "completion": "Lima"}]
    ds, stats = one(tok, tmp_path, rows, format="prompt_completion")
    assert len(ds) == 1 and stats["drop_reasons"] == {"empty completion": [1, 2]}
    chat = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    ds, stats = one(tok, tmp_path, chat, format="chat")
    assert len(ds) == 1 and stats["drop_reasons"] == {"no assistant turn": [1]}


QWEN3_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n{{ m['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_does_not_render_incrementally_names_the_fix_and_the_shipped_one_works(tmp_path):
    tok = load_tokenizer(str(DEMO / "model"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    msgs = [
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
        {"role": "user", "content": "And Chile?"},
        {"role": "assistant", "content": "Santiago"},
    ]
    path = write_jsonl(tmp_path / "q.jsonl", [{"messages": msgs}])
    with pytest.raises(HfgpuError, match=r"does not render turns incrementally.*data.chat_template=hfgpu:chat_templates/chatml.jinja"):
        tokenize(load_rows(str(path)), DataConfig(path=str(path), format="chat", chat_template=QWEN3_LIKE), tok, 128, "q")
    ds, _, _ = tokenize(
        load_rows(str(path)), DataConfig(path=str(path), format="chat", chat_template="hfgpu:chat_templates/chatml.jinja"), tok, 128, "q"
    )
    assert learned_text(tok, ds[0]) == "Lima<|im_end|>Santiago<|im_end|>"
    assert tok.decode(ds[0]["input_ids"]).startswith("<|im_start|>user\nCapital of Peru?<|im_end|>\n<|im_start|>assistant\nLima")


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_eval_prompts_are_tokenized_exactly_as_training_tokenizes_them(tmp_path, fmt):
    """A tokenizer that adds BOS: the prompt generation starts from is the training example's prefix
    (one BOS for the plain formats, none added to a rendered chat template)."""
    tok = load_tokenizer(str(DEMO / "model"))
    tok.add_bos_token = True
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    row = (
        {"instruction": "Capital of Peru?", "output": "Lima"}
        if fmt == "alpaca"
        else {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima"}]}
    )
    path = write_jsonl(tmp_path / "e.jsonl", [row])
    prepared = prepare_data(DataConfig(path=str(path), eval_path=str(path), format=fmt), tok, 128, 1)
    ids, reference = prepared.eval_prompts[0]
    train = prepared.train[0]
    first_learned = next(i for i, t in enumerate(train["labels"]) if t != IGNORE)
    assert ids == train["input_ids"][:first_learned] and reference == "Lima"
    assert ids.count(tok.bos_token_id) == (1 if fmt == "alpaca" else 0)


def test_a_broken_json_line_and_non_utf8_bytes_are_named_by_line(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c\n{"text": "d"}\n')
    with pytest.raises(HfgpuError, match=r"data file '.*broken.jsonl' line 3 is not valid JSON .*fix or remove that line"):
        load_rows(str(tmp_path / "broken.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "a"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(HfgpuError, match=r"line 2 has bytes that are not UTF-8 .*save the file as UTF-8"):
        load_rows(str(tmp_path / "latin1.jsonl"))


def test_rows_datasets_cannot_read_are_named_with_what_is_wrong(tmp_path):
    """A row that is not an object, a key twice, a CSV row with a field too many, parquet
    files whose column types differ: the first bad line (or file) and the fix, not datasets' generation error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = '{"instruction": "Capital of Peru?", "output": "Lima"}\n'
    cases = {
        "list.jsonl": (good * 3 + '["Paris", "France"]\n', r"line 4: a row must be a JSON object like .*got a list"),
        "dup.jsonl": ('{"instruction": "a", "output": "Old", "output": "City"}\n', r'line 1: key "output" appears twice'),
        "array.json": (f"[{good.strip()}, 5]", r"row 2 of the array: a row must be a JSON object .*got a number"),
        "ragged.csv": ("instruction,output\na,b\nc,d,e\n", r"line 3 has 3 fields, the header has 2"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(HfgpuError, match=f"data file '.*{name}' {message}"):
            load_rows(str(tmp_path / name))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"instruction": ["a"], "output": ["x"]}), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.table({"instruction": ["a"], "output": [[1]]}), tmp_path / "pq" / "b.parquet")
    with pytest.raises(HfgpuError, match=r"\(b.parquet\): column \"output\" is list<.*> there but string in a.parquet"):
        load_rows(str(tmp_path / "pq"))


@pytest.mark.slow
def test_a_huge_single_row_is_cut_before_tokenizing(tmp_path):
    """A 40 MB row at max_seq_len 64: tokenizing adds almost nothing to the process's peak memory
    (the whole string would take gigabytes of token objects) and the row is truncated like any long one."""
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "huge.jsonl", [{"text": "word " * 8_000_000}, {"text": "short"}])
    code = f"""
import resource, sys
sys.path.insert(0, {str(DEMO.parents[2])!r})
from hfgpu.data import tokenize
from hfgpu.modeling import load_tokenizer
from hfgpu.sources import load_rows
from hfgpu.recipe import DataConfig
tok = load_tokenizer({str(DEMO / "model")!r})
rows = load_rows({str(path)!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ds, stats, _ = tokenize(rows, DataConfig(path={str(path)!r}, format="text"), tok, 64, "huge")
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grew, stats["too_long"], max(ds["length"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=limit(300))
    assert r.returncode == 0, r.stderr[-2000:]
    grew_kib, too_long, longest = map(int, r.stdout.split()[-3:])
    assert too_long == 1 and longest == 64
    assert grew_kib < 300 * 1024, f"tokenizing grew the peak by {grew_kib / 1024:.0f} MiB"


def test_a_chat_eval_row_without_an_assistant_turn_is_skipped_not_a_crash(tok, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    prepared = prepare_data(DataConfig(path=str(path), eval_path=str(path), format="chat"), tok, 128, 1)
    assert [ref for _, ref in prepared.eval_prompts] == ["Lima"] and len(prepared.eval) == 1


def test_eval_fraction_holds_out_seeded_rows_that_never_train(tok, tmp_path):
    """data.eval_fraction: a seeded share of the training file becomes the eval set, disjoint from the training
    rows, the same on every run; it cannot be combined with another eval source."""
    rows = [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(path=str(path), eval_fraction=0.25)
    a, b = prepare_data(cfg, tok, 64, 2), prepare_data(cfg, tok, 64, 2)
    train, held = {tuple(x) for x in a.train["input_ids"]}, {tuple(x) for x in a.eval["input_ids"]}
    assert len(held) == 10 and len(train) == 30 and not train & held
    assert a.eval["input_ids"] == b.eval["input_ids"] and a.train["input_ids"] == b.train["input_ids"]
    assert len(a.eval_prompts) == 10 and a.stats["eval_held_out"] == 0.25
    with pytest.raises(HfgpuError, match="both choose the eval rows"):
        prepare_data(DataConfig(path=str(path), eval_fraction=0.25, eval_path=str(path)), tok, 64, 2)
    with pytest.raises(HfgpuError, match="leaves at least one row"):
        prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "one.jsonl", rows[:1])), eval_fraction=0.5), tok, 64, 2)


def test_eval_fraction_out_of_range_names_the_key():
    from hfgpu.recipe import validate_recipe

    with pytest.raises(HfgpuError, match="data.eval_fraction"):
        validate_recipe({"model": "m", "data": {"path": "x.jsonl", "eval_fraction": 1.5}})


def test_splits_slice_a_local_file_and_eval_on_training_rows_is_said(tok, tmp_path):
    """data.split / data.eval_split apply to a local file (its one split, 'train', sliced); a split the file does
    not have is refused naming the key; eval rows that are training rows are counted, never silent."""
    rows = [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"} for i in range(10)]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    apart = prepare_data(DataConfig(path=path, split="train[:80%]", eval_split="train[80%:]"), tok, 64, 2)
    train, held = {tuple(x) for x in apart.train["input_ids"]}, {tuple(x) for x in apart.eval["input_ids"]}
    assert len(train) == 8 and len(held) == 2 and not train & held and "eval_overlap" not in apart.stats
    assert [ref for _, ref in apart.eval_prompts] == ["8", "9"]
    shared = prepare_data(DataConfig(path=path, eval_split="train[80%:]"), tok, 64, 2)
    assert len(shared.train) == 10 and shared.stats["eval_overlap"] == 2 and shared.stats["eval_overlap_of"] == 2
    assert "data.eval_split=train[80%:] and data.split=train" in shared.stats["eval_overlap_keys"]
    for key, value in (("eval_split", "test_sft"), ("split", "validation[:10%]")):
        with pytest.raises(HfgpuError, match=rf"data\.{key}='{value[:8]}.*one split, 'train'"):
            prepare_data(DataConfig(path=path, **{key: value}), tok, 64, 2)
