"""
bench.py --what rehearsal on the tiny twin: the same sharded writer and the same commands as the full-size run
(train, resume, merge, predict on both, serve), the table and its last line, the exit status; the writer against
safetensors' own save_file and the tiny twin's checkpoint; the machine checks (disk, memory, --dir) before any write.

    python -m pytest -q tests/test_rehearsal.py            # ~1.5 min on 2 busy cores; -m "not slow": seconds
"""

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

import bench
import demo
import model
import rehearsal

GB = rehearsal.GB
LAST = re.compile(r"^rehearsal: (\d+) of (\d+) steps ok, peak RSS (\d+\.\d) GB \(weights (\d+\.\d) GB\)$")
# the memory model's parts for a 7B step (bench.py --what memory), so the machine checks run without computing them
ESTIMATE_7B = {"trainable weights": 0.59 * GB, "total": 16.9 * GB}
TINY_ESTIMATE = {"trainable weights": 0.002 * GB, "total": 0.02 * GB}
# openpi-client 0.1.2 opens its connection the way websockets 17 warns about (still supported): not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")


def test_writer_matches_safetensors(tmp_path):
    """Tensor by tensor, the same bytes as save_file writes for the whole dict, and a wrong tensor is refused."""
    torch.manual_seed(0)
    tensors = {k: torch.randn(s).bfloat16() for k, s in [("b.weight", (3, 5)), ("a.bias", (7,)), ("x.10.w", (2, 2))]}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    rehearsal.write_safetensors(str(tmp_path / "ours.safetensors"), shapes, lambda k, s: tensors[k], {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"a.bias: made torch.float32 \(7,\)"):
        rehearsal.write_safetensors(str(tmp_path / "bad.safetensors"), shapes, lambda k, s: torch.zeros(s))


def test_published_shapes_are_the_tiny_twins(tmp_path):
    """The names and shapes written are those of demo.make_tiny's checkpoint, skip-list keys included; the split is
    three consecutive groups of all of them."""
    demo.make_tiny(str(tmp_path / "tiny"))
    with safe_open(str(tmp_path / "tiny" / "model.safetensors"), "pt") as f:
        tiny = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    shapes = rehearsal.published_shapes(demo.tiny_config(demo.make_tokenizer()))
    assert shapes == tiny
    shards = rehearsal.split_shards(shapes)
    assert len(shards) == 3 and [k for s in shards for k in s] == list(shapes)


def test_widened_tokenizer():
    """Llama-2's size with <PAD> at 32000, and every demo prompt tokenized exactly as demo's own tokenizer does."""
    wide, tiny = rehearsal.widened_tokenizer(), demo.make_tokenizer()
    assert wide.get_vocab_size() == 32001 and wide.token_to_id("<PAD>") == 32000
    for text in demo.SEEN + demo.UNSEEN + ["Grab the crimson sneaker, then zebra-stripe it!"]:
        assert model.prompt_ids(wide, text) == model.prompt_ids(tiny, text)
    config, _ = rehearsal.base_config("tiny")
    assert config["text_config"]["vocab_size"] == 32064 and config["pad_token_id"] == 32000


def rehearse(capsys, *flags):
    """bench.py --what rehearsal on the tiny twin, in this process: (exit code, output lines)."""
    code = 0
    try:
        bench.main(["--what", "rehearsal", "--model", "tiny", *flags])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out.strip().splitlines()


@pytest.mark.slow
def test_rehearsal_tiny(tmp_path, capsys, monkeypatch):
    """Every step ok, each row's RSS a real number, the kept checkpoint in the published layout."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "r"
    code, lines = rehearse(capsys, "--dir", str(root), "--keep")
    assert code == 0, "\n".join(lines)
    ok, n, peak, weights = LAST.match(lines[-1]).groups()
    assert ok == n == str(len(rehearsal.STEPS)) and 0.2 < float(peak) < 2.0 and weights == "0.0"
    for name in rehearsal.STEPS:
        row = next(line for line in lines if line.startswith(name + "  "))
        wall, rss = map(float, row[len(name) :].split()[:2])
        assert row.endswith("ok") and wall > 0 and 0.05 < rss < 2.0, row
    assert any(line.startswith("checkpoint vs export: max |difference| 0 ") for line in lines)
    base = root / "base"
    index = json.loads((base / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    total = 0
    for file in files:
        with safe_open(str(base / file), "pt") as f:
            assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == file)
            total += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert total == index["metadata"]["total_size"]
    assert json.loads((base / "added_tokens.json").read_text()) == {"<PAD>": 32000}
    assert Tokenizer.from_file(str(base / "tokenizer.json")).get_vocab_size() == 32001
    assert (root / "run" / "step_000003" / "trainer_state.pt").exists() and (root / "export" / "config.json").exists()


@pytest.mark.slow
def test_rehearsal_stops_at_a_failing_step(tmp_path, capsys, monkeypatch):
    """train.py failing: its row says why, the rest are not run, exit 1, and nothing is left without --keep."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(rehearsal, "TRAIN_FLAGS", rehearsal.TRAIN_FLAGS + ["--no_such_flag"])
    monkeypatch.setattr(bench, "estimate_memory", lambda *a, **k: TINY_ESTIMATE)  # not what this test checks
    root = tmp_path / "r"
    code, lines = rehearse(capsys, "--dir", str(root))
    assert code == 1
    assert LAST.match(lines[-1]).groups()[:2] == ("1", str(len(rehearsal.STEPS)))
    assert any(line.startswith("train.py  ") and "exit 2: " in line for line in lines)
    assert sum(line.endswith("not run") for line in lines) == len(rehearsal.STEPS) - 2
    assert any("unrecognized arguments: --no_such_flag" in line for line in lines)
    assert not root.exists()


@pytest.mark.parametrize(
    "probe, value, message",
    [
        ("disk_free", 10 * GB, r"^error: --dir \S+: 10\.0 GB free on its disk, the rehearsal writes 3\d\.\d GB "),
        ("mem_available", 8 * GB, r"^error: this machine has 8\.0 GB of memory available \(MemAvailable\), the "),
    ],
)
def test_too_small_a_machine(tmp_path, monkeypatch, probe, value, message):
    """OpenVLA-7B's shapes on a disk or a memory too small: one line, and --dir is never made."""
    monkeypatch.setattr(bench, "estimate_memory", lambda *a, **k: ESTIMATE_7B)
    monkeypatch.setattr(rehearsal, probe, lambda *a: value)
    root = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        bench.main(["--what", "rehearsal", "--dir", str(root)])
    assert re.match(message, str(e.value.code)) and "\n" not in str(e.value.code)
    assert not root.exists()


def test_dir_in_use(tmp_path, monkeypatch):
    """A --dir that holds files is refused before anything is written into it."""
    monkeypatch.setattr(bench, "estimate_memory", lambda *a, **k: ESTIMATE_7B)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"^error: --dir \S+: exists and is not an empty directory"):
        bench.main(["--what", "rehearsal", "--dir", str(tmp_path)])
    assert os.listdir(tmp_path) == ["notes.txt"]
    with pytest.raises(SystemExit, match=r"^error: --llm_layers must be at least 1, got 0$"):
        bench.main(["--what", "rehearsal", "--llm_layers", "0", "--dir", str(tmp_path)])


def test_remove_written(tmp_path):
    """Without --keep: an empty --dir given is emptied again and stays; one the rehearsal made goes."""
    for made in (False, True):
        root = tmp_path / f"made-{made}"
        (root / "base").mkdir(parents=True)
        (root / "base" / "config.json").write_text("{}")
        (root / "predict-export.npy").write_text("")
        rehearsal.remove_written(str(root), made)
        assert (not root.exists()) if made else os.listdir(root) == []


def test_a_disk_that_fills_while_writing(tmp_path, monkeypatch):
    """The write failing part way (another writer filled the disk): one line, and what was written is gone."""
    monkeypatch.setattr(bench, "estimate_memory", lambda *a, **k: TINY_ESTIMATE)

    def full(path, *a, **k):
        open(path, "wb").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rehearsal, "write_safetensors", full)
    root = tmp_path / "r"
    with pytest.raises(SystemExit, match=r"^error: writing the checkpoint into \S+/base: \[Errno 28\] No space left"):
        bench.main(["--what", "rehearsal", "--model", "tiny", "--dir", str(root)])
    assert not root.exists()
