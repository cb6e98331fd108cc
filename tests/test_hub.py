"""Push, merge and generate against a real local HTTP server speaking the Hub's protocol."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DEMO, ROOT, limit, recipe_dict
from hub_server import HubServer

TOKEN = "hf_hfgpuTestToken0123456789"
BASE = ("--base-model-id", "org/tiny-base")  # the demo trains from a folder in the package: its Hub id is named


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo, trained once (fewer epochs) for every Hub test."""
    out = tmp_path_factory.mktemp("runs") / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "hfgpu.finetune", "recipes/demo_cpu.yaml", f"output_dir={out}", "train.epochs=12", "train.eval_every=null"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=limit(300),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture()
def hub():
    with HubServer(TOKEN) as server:
        yield server


def env_for(hub, token=TOKEN, home=None):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update({"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(home or hub.home)})
    if token:
        env["HF_TOKEN"] = token
    return env


def hfgpu(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "hfgpu", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=limit(timeout))


@pytest.fixture(autouse=True)
def _home(hub, tmp_path):
    hub.home = tmp_path / "hf-home"


@pytest.mark.slow
def test_an_adapter_trained_from_a_local_copy_loads_from_the_hub_alone(demo_run, hub, tmp_path, monkeypatch):
    """The base is uploaded to the server, the run trained on a local copy of it; pushed with --base-model-id, the
    adapter downloads and loads with plain peft through the server alone (a fresh cache, no local path), with the
    run's own logits."""
    import huggingface_hub.constants
    from huggingface_hub import HfApi

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # it blocks localhost too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # read at import; the server speaks plain LFS
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("org/tiny-base")
    api.upload_folder(folder_path=str(DEMO / "model"), repo_id="org/tiny-base")
    refused = hfgpu(["push", str(demo_run), "--repo-id", "me/capitals-lora"], env_for(hub))
    assert refused.returncode == 2 and "--base-model-id OWNER/NAME" in refused.stderr and "me/capitals-lora" not in hub.repos
    r = hfgpu(["push", str(demo_run), "--repo-id", "me/capitals-lora", *BASE], env_for(hub))
    assert r.returncode == 0, r.stderr[-2000:]
    files = hub.repos["me/capitals-lora"].head[1]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "loss.png"} <= set(files)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-base"
    assert "base_model: org/tiny-base" in files["README.md"].decode()
    # the run folder keeps the base it loads from here
    assert json.loads((demo_run / "adapter_config.json").read_text())["base_model_name_or_path"] == str((DEMO / "model").resolve())

    ids = [5, 60, 70, 80, 90, 100]
    code = (
        "import json, sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "m = AutoPeftModelForCausalLM.from_pretrained('me/capitals-lora').eval()\n"
        f"print(json.dumps(m(input_ids=torch.tensor([{ids}])).logits[0, -1].tolist()))\n"
    )
    env = {**env_for(hub, home=tmp_path / "fresh-home")}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=limit(300))
    assert got.returncode == 0, got.stderr[-2000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO / "model"), demo_run).eval()
    with torch.no_grad():
        expected = original(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(torch.tensor(json.loads(got.stdout.strip().splitlines()[-1])), expected, rtol=0, atol=1e-6)
    assert any(p.startswith("/org/tiny-base/resolve/") or "/org/tiny-base/" in p for _, p in hub.requests)
    # the token is nowhere: not in the run's files, nor what the command printed
    for f in demo_run.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f
    assert TOKEN not in r.stdout + r.stderr


def test_model_card_describes_the_run(demo_run, tmp_path):
    from huggingface_hub import ModelCard

    from hfgpu.hub import Run, model_card

    run_dir = tmp_path / "run"
    shutil.copytree(demo_run, run_dir)
    card = model_card(Run(run_dir), "me/qwen-capitals", base_id="Qwen/Qwen2.5-0.5B")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == "Qwen/Qwen2.5-0.5B" and loaded.data.library_name == "peft"
    assert {"hfgpu", "lora"} <= set(loaded.data.tags)
    text = loaded.text
    for needle in (
        "| strategy | lora |",
        "micro-batch × accumulation",
        "planned peak memory",
        "eval_loss",
        "eval_exact_match",
        "![loss](loss.png)",
        'AutoPeftModelForCausalLM.from_pretrained("me/qwen-capitals")',
        "learning rate",
    ):
        assert needle in text, needle


def test_unchanged_repush_makes_no_commit_and_an_interrupted_push_can_rerun(demo_run, hub):
    env = env_for(hub)
    hub.fail_next = 1  # the network fails at the commit
    r = hfgpu(["push", str(demo_run), "--repo-id", "me/retry", *BASE], env)
    assert r.returncode == 2 and "push to me/retry failed" in r.stderr and "run the same command again" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and TOKEN not in r.stderr and "Traceback" not in r.stderr
    assert (demo_run / "adapter_model.safetensors").is_file()
    r = hfgpu(["push", str(demo_run), "--repo-id", "me/retry", *BASE], env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert hub.commit_count("me/retry") == 1
    puts = sum(1 for m, _ in hub.requests if m == "PUT")
    r = hfgpu(["push", str(demo_run), "--repo-id", "me/retry", *BASE], env)
    assert r.returncode == 0 and "nothing changed" in r.stdout
    assert hub.commit_count("me/retry") == 1 and sum(1 for m, _ in hub.requests if m == "PUT") == puts


@pytest.mark.slow
def test_push_with_gguf_uploads_a_file_llama_cpp_reads_and_says_how_to_run_it(demo_run, hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    r = hfgpu(["push", str(demo_run), "--repo-id", "me/capitals-gguf", "--gguf", "q8_0", *BASE], env_for(hub))
    assert r.returncode == 0, r.stderr[-2000:]
    files = hub.repos["me/capitals-gguf"].head[1]
    assert {"demo-q8_0.gguf", "adapter_model.safetensors", "README.md"} <= set(files)
    from huggingface_hub import hf_hub_download
    from transformers import AutoModelForCausalLM

    card = open(hf_hub_download("me/capitals-gguf", "README.md", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "c")).read()
    assert "llama-cli -hf me/capitals-gguf --hf-file demo-q8_0.gguf" in card and "ollama run hf.co/me/capitals-gguf:Q8_0" in card
    assert "- gguf" in card
    path = hf_hub_download("me/capitals-gguf", "demo-q8_0.gguf", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    assert model.config.num_hidden_layers == 2
    bad = hfgpu(["push", str(demo_run), "--repo-id", "me/x", "--gguf", "q4_k_m"], env_for(hub))
    assert bad.returncode == 2 and "'q4_k_m'" in bad.stderr and "me/x" not in hub.repos


@pytest.mark.slow
def test_merged_push_and_merge_give_the_adapters_logits(demo_run, hub, tmp_path):
    r = hfgpu(["merge", str(demo_run), "--out", str(tmp_path / "merged")], env_for(hub))
    assert r.returncode == 0, r.stderr[-2000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO / "model"), demo_run).eval()
    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    again = hfgpu(["merge", str(demo_run), "--out", str(tmp_path / "merged")], env_for(hub))
    assert again.returncode == 2 and "is not empty" in again.stderr

    r = hfgpu(["push", str(demo_run), "--repo-id", "me/capitals-merged", "--merged", "--private"], env_for(hub))
    assert r.returncode == 0, r.stderr[-2000:]
    repo = hub.repos["me/capitals-merged"]
    assert (
        repo.private
        and {"config.json", "model.safetensors", "README.md"} <= set(repo.head[1])
        and "adapter_config.json" not in repo.head[1]
    )
    card = repo.head[1]["README.md"].decode()
    assert "merged into the base weights" in card and "library_name: transformers" in card


def test_qlora_merge_reloads_the_base_unquantized(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from hfgpu.finetune import finetune
    from hfgpu.hub import merge
    from hfgpu.recipe import validate_recipe

    res = finetune(
        validate_recipe(recipe_dict(tiny_model_dir, tmp_path / "q", strategy="qlora", train={"max_steps": 3})), say=lambda *a, **k: None
    )
    out = merge(res.output_dir, tmp_path / "q-merged", say=lambda *a, **k: None)
    weights = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 on CPU (16-bit on a GPU plan), never uint8
    assert not any("lora" in k or "absmax" in k for k in weights)


@pytest.mark.slow
def test_generate_uses_the_runs_template(demo_run):
    r = hfgpu(
        ["generate", str(demo_run), "--prompt", "Tell me the capital of Peru.", "--max-new-tokens", "6"],
        {**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # the same greedy answer from plain transformers + peft, with the prompt rendered as training rendered it
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfgpu.render import ALPACA

    tok = AutoTokenizer.from_pretrained(demo_run)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO / "model"), demo_run).eval()
    ids = tok(ALPACA.format(instruction="Tell me the capital of Peru."), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert expected and r.stdout.strip() == expected


@pytest.mark.parametrize(
    "args,token,needle",
    [
        (["--repo-id", "me/x"], None, "no Hugging Face token"),
        (["--repo-id", "not a repo"], TOKEN, "is not owner/name"),
        (["--repo-id", "noslash"], TOKEN, "is not owner/name"),
        (["--repo-id", "me/x", *BASE], "hf_wrong_token", "the token was rejected"),
        (["--repo-id", "me/x"], TOKEN, "--base-model-id OWNER/NAME"),
        (["--repo-id", "me/x", "--base-model-id", "no slash"], TOKEN, "is not a Hub id"),
    ],
)
def test_push_errors_are_one_line_exit_2(demo_run, hub, args, token, needle, tmp_path):
    r = hfgpu(["push", str(demo_run), *args], env_for(hub, token=token, home=tmp_path / "empty-home"))
    assert r.returncode == 2 and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "hf_wrong_token" not in r.stderr
    assert "me/x" not in hub.repos  # nothing was uploaded


def test_push_refuses_an_unfinished_run(hub, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "plan.json").write_text("{}")
    r = hfgpu(["push", str(tmp_path / "half"), "--repo-id", "me/x"], env_for(hub))
    assert r.returncode == 2 and "is not a finished hfgpu run" in r.stderr


@pytest.mark.slow
def test_recipe_hub_repo_id_pushes_at_the_end_of_training(hub, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hfgpu.finetune",
            "recipes/demo_cpu.yaml",
            f"output_dir={tmp_path / 'auto'}",
            "train.max_steps=5",
            "hub.repo_id=me/auto-push",
            "hub.base_model_id=org/tiny-base",
            "eval.metrics=[]",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env_for(hub),
        timeout=limit(300),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "adapter_model.safetensors" in hub.repos["me/auto-push"].head[1] and hub.repos["me/auto-push"].private
    assert "pushed" in r.stdout and TOKEN not in r.stdout + r.stderr


def test_damaged_plan_json_is_one_line(demo_run, tmp_path):
    """A run folder whose plan.json was damaged: push/merge/generate say which file, exit 2, no traceback."""
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (run / "plan.json").write_text('{"model": "x"}')
    r = subprocess.run(
        [sys.executable, "-m", "hfgpu", "merge", str(run), "--out", str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=limit(120),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "plan.json" in r.stderr and "is not a plan.json hfgpu wrote" in r.stderr
    assert not (tmp_path / "merged").exists()


def test_recipe_pushing_an_adapter_of_a_local_base_is_refused_before_training(hub, tmp_path):
    out = tmp_path / "never"
    r = subprocess.run(
        [sys.executable, "-m", "hfgpu.finetune", "recipes/demo_cpu.yaml", f"output_dir={out}", "hub.repo_id=me/auto-push"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env_for(hub),
        timeout=limit(120),
    )
    assert r.returncode == 2 and "hub.base_model_id" in r.stderr and "--base-model-id OWNER/NAME" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists() and "me/auto-push" not in hub.repos
