"""Metrics reach metrics.jsonl and the real trackers; report, inspect and sweep end to end; the report in a
real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from softprompt.checkpoint import load_tensors, read_checkpoint, save_checkpoint

from softprompt.cli import main
from softprompt.interpret import nearest_tokens, prompt_similarity

TRAIN = ["--max-steps", "4", "--eval-every", "2", "--batch-size", "8", "--no-progress", "--max-length", "24"]
ARTIFACTS = Path(os.environ.get("SOFTPROMPT_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file: a 7-byte header, then LevelDB-style log blocks of 32 KiB
    whose records (full, or first/middle/last fragments) are protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_every_record_reaches_wandb_offline_and_tensorboard(tiny_dirs, tiny_csv, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out_dir = tmp_path / "run"
    code, _, err = run(["train", *TRAIN, "--prompt-length", "3", "--model", tiny_dirs["llama"], "--data", tiny_csv,
                        "--output", out_dir, "--report-to", "wandb,tensorboard"], capsys)
    assert code == 0, err
    logged = records(out_dir)
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["steps_per_s"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)

    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [e.step for e in events.Scalars("dev_accuracy")] == [2, 4]
    assert [e.value for e in events.Scalars("tokens_per_s")] == pytest.approx([r["tokens_per_s"] for r in steps])

    files = list((out_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "wandb wrote no offline run"
    history = wandb_history(files[0])
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in steps])
    evals = {r["step"]: r["dev_accuracy"] for r in logged if "dev_accuracy" in r}
    assert {h["_step"]: h["dev_accuracy"] for h in history if "dev_accuracy" in h} == pytest.approx(evals)


def test_tracker_names_and_missing_libraries_are_one_line(tiny_dirs, tiny_csv, tmp_path, capsys, monkeypatch):
    base = ["train", *TRAIN, "--model", tiny_dirs["llama"], "--data", tiny_csv, "--output", tmp_path / "r"]
    code, _, err = run(base + ["--report-to", "wandb,comet"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: unknown tracker 'comet' in --report-to; choose from wandb, tensorboard, trackio, mlflow"]
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: import fails
    code, _, err = run(base + ["--report-to", "mlflow"], capsys)
    assert code == 2 and "needs the mlflow package: pip install 'softprompt[mlflow]'" in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # refused before any training


def test_nearest_tokens_and_prompt_similarity_are_exact(tiny_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    torch.manual_seed(0)
    vocab = torch.randn(len(tokenizer), 16)
    ids = tokenizer.convert_tokens_to_ids(["good", "bad", "film"])
    rows = nearest_tokens(vocab[ids] * 3.0, vocab, tokenizer, top=4)  # scale does not change cosine
    assert [row[0].token_id for row in rows] == ids
    assert [row[0].token for row in rows] == ["good", "bad", "film"]
    assert all(row[0].cosine == pytest.approx(1.0) and len(row) == 4 for row in rows)
    assert all(row[i].cosine >= row[i + 1].cosine for row in rows for i in range(3))
    p = torch.randn(5, 16)
    sims = prompt_similarity([p, -p, torch.randn(5, 8)])
    assert sims[0][0] == pytest.approx(1) and sims[0][1] == pytest.approx(-1)
    assert sims[0][2] is None and sims[2][0] is None and sims[2][2] == pytest.approx(1)


@pytest.fixture(scope="module")
def sweep_dir(tiny_dirs, tmp_path_factory):
    """A two-run sweep (prompt lengths 3 and 4) on tiny data, reported together."""
    root = tmp_path_factory.mktemp("sweep")
    words = {"good": "positive", "bad": "negative"}
    data = root / "tiny.csv"
    data.write_text("\n".join(["text,label"] + [f"the film was {w} number {i},{words[w]}"
                                                 for i in range(40) for w in words]))
    code = main(["sweep", "--prompt-lengths", "3,4", "--model", tiny_dirs["llama"], "--data", str(data), *TRAIN,
                 "--output", str(root / "out")])
    assert code == 0
    return root / "out"


class TagCollector(HTMLParser):
    """Tags of a page that load something (src/href), and how many scripts it has."""

    def __init__(self) -> None:
        super().__init__()
        self.external, self.scripts = [], 0

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        self.external += [(tag, v) for k, v in attrs if k in ("src", "href") and v and not v.startswith("#")]


def test_sweep_trains_the_grid_and_reports_it(sweep_dir):
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["grid"] == {"prompt_length": [3, 4]}
    assert [r["run"] for r in summary["runs"]] == ["k3", "k4"]
    for run in summary["runs"]:
        meta = json.loads((sweep_dir / run["run"] / "best" / "softprompt.json").read_text())
        assert meta["prompt"]["num_virtual_tokens"] == run["prompt_length"]
        assert run["dev"] == meta["metrics"]["dev"] and run["steps"] == 4
        results = json.loads((sweep_dir / run["run"] / "results.json").read_text())
        confusion = results["dev_confusion"]  # rows: true label, columns: predicted
        assert sum(map(sum, confusion)) == 8
        assert (confusion[0][0] + confusion[1][1]) / 8 == pytest.approx(results["dev"]["accuracy"])
    page = (sweep_dir / "report.html").read_text()
    tags = TagCollector()
    tags.feed(page)
    assert tags.external == []  # self-contained: no script, style or image fetched from anywhere
    assert tags.scripts >= 2  # plotly.js inline, then the figures
    assert "k3" in page and "k4" in page and "nearest vocabulary tokens" in page


def test_inspect_prints_the_nearest_tokens(tiny_dirs, sweep_dir, capsys, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(sweep_dir / "k3" / "best", checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    embeddings = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).get_input_embeddings().weight.detach()
    ids = tokenizer.convert_tokens_to_ids(["good", "bad", "film"])
    tensors = load_tensors(checkpoint)
    tensors["prompt"] = embeddings[ids].clone()  # a prompt that is exactly three real tokens
    save_checkpoint(checkpoint, read_checkpoint(checkpoint), tensors)
    code, out, err = run(["inspect", checkpoint, "--top", "3"], capsys)
    assert code == 0, err
    rows = out.strip().splitlines()[1:]
    assert len(rows) == 3
    for row, word in zip(rows, ["good", "bad", "film"]):
        first = row.split()[1:3]
        assert first == [repr(word), "1.000"]
    code, _, err = run(["inspect", tmp_path / "nowhere"], capsys)
    assert code == 2 and "is not a softprompt checkpoint" in err


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, _, err = run(["report", tmp_path], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {tmp_path} is not a softprompt run folder (no metrics.jsonl), nor a folder of them"]


def _browser():
    """Debian's chromium and its driver, or None (CI installs both and sets SOFTPROMPT_REQUIRE_BROWSER)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if not (chromium and driver and webdriver):
        if os.environ.get("SOFTPROMPT_REQUIRE_BROWSER"):
            pytest.fail("SOFTPROMPT_REQUIRE_BROWSER is set but chromium, chromedriver or selenium is missing")
        pytest.skip("needs chromium, chromedriver and selenium (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_report_renders_every_plot_in_a_headless_browser(sweep_dir):
    page = sweep_dir / "report.html"
    expected = page.read_text().count('class="plotly-graph-div"')
    assert expected >= 8  # 4 overlaid curves, 2 per-run figures, 2 confusion matrices, the similarity map
    browser = _browser()
    try:
        browser.get(page.as_uri())
        browser.set_script_timeout(60)
        # Plotly draws the figures one after another: wait for all of them, not the first.
        plots = browser.execute_async_script("""
            const expected = arguments[0], done = arguments[arguments.length - 1];
            const check = (tries) => {
              const divs = [...document.querySelectorAll('.js-plotly-plot')];
              const drawn = divs.map(d => ({
                  svg: !!d.querySelector('.main-svg'),
                  traces: d.querySelectorAll('.scatterlayer .trace, .heatmaplayer .hm').length,
                  data: (d.data || []).length,
                  width: d.getBoundingClientRect().width, height: d.getBoundingClientRect().height}));
              if (drawn.length >= expected && drawn.every(x => x.svg && x.traces > 0) || tries > 200) done(drawn);
              else setTimeout(() => check(tries + 1), 100);
            };
            check(0);""", expected)
        assert len(plots) == expected
        for plot in plots:
            assert plot["svg"] and plot["traces"] > 0 and plot["data"] > 0, plot
            assert plot["width"] > 100 and plot["height"] > 100, plot
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1400, min(int(height), 12000))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        browser.quit()
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
