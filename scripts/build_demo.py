"""Build the embedded demo: a byte-level BPE tokenizer, a tiny random-init Llama and a small data set.

    python scripts/build_demo.py                 # writes hfgpu/resources/demo/ (committed; ~1 MB)
    python scripts/build_demo.py --preference    # only the preference pairs of the DPO demo
    python scripts/build_demo.py --dates         # only the date task of the SmolLM2 demo (recipes/demo_smollm2_cpu.yaml)

The task: answer "what is the capital of X?" for 30 countries. Training uses four phrasings of the
question; the eval split uses a fifth phrasing the model never sees, so exact match on it measures
whether the fine-tune learned the task rather than the strings. Before fine-tuning the model
answers nothing correctly.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).resolve().parents[1] / "hfgpu" / "resources" / "demo"

CAPITALS = [
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"),
    ("Turkey", "Ankara"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Nepal", "Kathmandu"),
    ("Ghana", "Accra"),
    ("Mali", "Bamako"),
    ("Fiji", "Suva"),
]
TRAIN_PHRASINGS = [
    "What is the capital of {}?",
    "Name the capital city of {}.",
    "Which city is the capital of {}?",
    "{} has its capital in which city?",
]
EVAL_PHRASINGS = ["Tell me the capital of {}."]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def rows(phrasings):
    return [{"instruction": p.format(country), "input": "", "output": capital} for country, capital in CAPITALS for p in phrasings]


# The preference demo (recipes/demo_dpo_cpu.yaml): the same questions, two styles of answer. Chosen: a confident
# sentence; rejected: a hedge. Held-out pairs ask about countries training never saw, so preference accuracy on
# them measures whether the model learned the style, not the strings.
CHOSEN = "The capital of {} is {}."
REJECTED = "{1}? I am not sure, maybe look it up."
PREFERENCE_EVAL_COUNTRIES = 6  # the last six countries: only in the held-out pairs


def preference_rows(countries, phrasings):
    return [
        {
            "prompt": [{"role": "user", "content": p.format(country)}],
            "chosen": [{"role": "assistant", "content": CHOSEN.format(country, capital)}],
            "rejected": [{"role": "assistant", "content": REJECTED.format(country, capital)}],
        }
        for country, capital in countries
        for p in phrasings
    ]


def write_preference() -> None:
    random.seed(0)
    seen, held_out = CAPITALS[:-PREFERENCE_EVAL_COUNTRIES], CAPITALS[-PREFERENCE_EVAL_COUNTRIES:]
    train = preference_rows(seen, TRAIN_PHRASINGS)
    random.shuffle(train)
    evals = preference_rows(held_out, TRAIN_PHRASINGS + EVAL_PHRASINGS)
    for name, data in (("style_pairs_train.jsonl", train), ("style_pairs_eval.jsonl", evals)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"wrote {OUT}: {len(train)} train / {len(evals)} eval preference pairs")


# The SmolLM2 demo (recipes/demo_smollm2_cpu.yaml): write a date given in words as ISO 8601 (YYYY-MM-DD). A real
# pretrained 135M model answers with prose or code (exact match 0); the fine-tune has to learn the output format, the
# month numbers and the zero padding. Train and eval dates are disjoint, and eval also uses a phrasing of the
# request that training never shows, so exact match measures the task, not memorised strings.
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
DATE_FORMATS = [
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{MONTHS[m - 1][:3]} {d}, {y}",
    lambda y, m, d: f"the {d}{'th' if 10 <= d % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')} of {MONTHS[m - 1]}, {y}",
]
DATE_TRAIN_REQUESTS = [
    "Write this date in ISO format (YYYY-MM-DD): {}",
    "Convert to YYYY-MM-DD: {}",
    "What is {} in ISO 8601 date format?",
]
DATE_EVAL_REQUESTS = DATE_TRAIN_REQUESTS + ["Give the ISO date (YYYY-MM-DD) for {}."]
DATES_TRAIN, DATES_EVAL = 480, 40


def date_rows(dates, requests, rng):
    out = []
    for y, m, d in dates:
        words = rng.choice(DATE_FORMATS)(y, m, d)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": rng.choice(requests).format(words)},
                    {"role": "assistant", "content": f"{y:04d}-{m:02d}-{d:02d}"},
                ]
            }
        )
    return out


def write_dates() -> None:
    import datetime

    rng = random.Random(0)
    start, days = datetime.date(1950, 1, 1), (datetime.date(2039, 12, 31) - datetime.date(1950, 1, 1)).days
    picked = rng.sample(range(days), DATES_TRAIN + DATES_EVAL)
    dates = [(t.year, t.month, t.day) for t in (start + datetime.timedelta(days=i) for i in picked)]
    train = date_rows(dates[:DATES_TRAIN], DATE_TRAIN_REQUESTS, rng)
    evals = date_rows(dates[DATES_TRAIN:], DATE_EVAL_REQUESTS, rng)
    for name, data in (("dates_train.jsonl", train), ("dates_eval.jsonl", evals)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"wrote {OUT}: {len(train)} train / {len(evals)} eval date examples")


def main() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    random.seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    train, evals = rows(TRAIN_PHRASINGS), rows(EVAL_PHRASINGS)
    random.shuffle(train)
    for name, data in (("capitals_train.jsonl", train), ("capitals_eval.jsonl", evals)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in data))

    # The tokenizer learns from the examples as training renders them (the Alpaca template of
    # hfgpu.data) and as chat turns, so prompts are a few dozen tokens, not hundreds of characters.
    from hfgpu.render import ALPACA, ALPACA_INPUT

    corpus = [ALPACA.format(instruction=r["instruction"]) + r["output"] for r in train + evals]
    corpus += [ALPACA_INPUT.format(instruction=r["instruction"], input=r["output"]) for r in train[:20]]
    corpus += [f"<|user|>\n{r['instruction']}</s>\n<|assistant|>\n{r['output']}</s>\n" for r in train + evals]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    model_dir = OUT / "model"
    tokenizer.save_pretrained(model_dir)

    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(model_dir)
    print(
        f"wrote {OUT}: {sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tokenizer)}, "
        f"{len(train)} train / {len(evals)} eval examples"
    )


if __name__ == "__main__":
    if "--preference" in sys.argv:  # only the preference pairs (the tokenizer and the model stay as they are)
        write_preference()
    elif "--dates" in sys.argv:  # only the SmolLM2 demo's date task
        write_dates()
    else:
        main()
        write_preference()
        write_dates()
