"""The level-1 chunk autoencoder: objective, data, training, checkpoint/resume and reports."""

import argparse
import dataclasses
import json

import pytest
import torch

from mllm.encoders import ChunkEncoder
from mllm.tokenizers import ByteTokenizer
from mllm.training.autoencoder import ChunkDecoder, autoencode_loss, chunk_dataset
from mllm.training.convergence import AutoencoderConfig, add_arguments, run, train_autoencoder

# A few hundred byte-level chunks of the stdlib docstrings and a model small enough for seconds.
TINY = AutoencoderConfig(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    heads=2,
    cls_heads=2,
    chunk_size=32,
    batch_size=16,
    steps=40,
    lr=3e-3,
    warmup=5,
    eval_every=2,
    eval_chunks=16,
    max_chunks=300,
    tokenizer="bytes",
)


def _without_time(rows):
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("autoencoder")
    return out, train_autoencoder(TINY, out_dir=out, resume=False, progress=False)


def test_training_converges(tiny_run):
    _, rows = tiny_run
    assert [r["step"] for r in rows] == list(range(0, 41, 2))
    losses = [r["loss"] for r in rows[1:]]  # row 0 is the loss before training
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert rows[-1]["train_token_acc"] > rows[0]["train_token_acc"] + 0.05
    assert rows[-1]["heldout_token_acc"] > rows[0]["heldout_token_acc"] + 0.05


def test_reports_are_written(tiny_run):
    out, rows = tiny_run
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "convergence.json").read_text())
    assert saved["rows"] == rows and saved["config"] == dataclasses.asdict(TINY)
    assert 0 < saved["meta"]["baseline_acc"] < 1 and len(saved["examples"]) == 3
    lines = (out / "convergence.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| step |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:3] == ["step", "loss", "train token acc"]
    assert columns[3].startswith("held-out token acc (baseline always")
    table = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == len(rows) and table[-1].startswith("| 40 |")


@pytest.mark.parametrize("decoder", ["causal", "parallel"])
def test_loss_ignores_padding(decoder, gen):
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    encoder = ChunkEncoder.from_scratch(32, 1, 2, 2, 24, tokenizer)
    model = ChunkDecoder(tokenizer.vocab_size, 32, 1, 2, 24, causal=decoder == "causal")
    lengths = torch.tensor([5, 17, 1, 11])
    ids = torch.randint(0, 256, (4, 24), generator=gen)
    pad = torch.arange(24) >= lengths[:, None]
    with torch.no_grad():
        expected = autoencode_loss(encoder, model, ids.masked_fill(pad, tokenizer.pad_id), lengths)
        scrambled = autoencode_loss(encoder, model, torch.where(pad, torch.randint(0, 257, ids.shape), ids), lengths)
        trimmed = autoencode_loss(encoder, model, ids[:, :17], lengths)  # padded to 17 instead of 24
    for got in (scrambled, trimmed):
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
        assert got[1] == expected[1]


def test_resume_continues_an_interrupted_run(tmp_path):
    # Token dropout draws random numbers: the resumed run must restore the RNG to match.
    config = dataclasses.replace(TINY, steps=10, eval_every=5, token_dropout=0.2)
    first = train_autoencoder(config, out_dir=tmp_path / "a", resume=False, progress=False)
    longer = dataclasses.replace(config, steps=20)
    resumed = train_autoencoder(longer, out_dir=tmp_path / "a", progress=False)
    straight = train_autoencoder(longer, out_dir=tmp_path / "b", resume=False, progress=False)
    assert [r["step"] for r in first] == [0, 5, 10]
    assert [r["step"] for r in resumed] == [0, 5, 10, 15, 20]
    assert resumed[:3] == first  # continued from step 10, not restarted
    assert _without_time(resumed) == _without_time(straight)


def test_resume_refuses_another_configuration(tmp_path):
    config = dataclasses.replace(TINY, steps=2, eval_every=2)
    train_autoencoder(config, out_dir=tmp_path, resume=False, progress=False)
    with pytest.raises(ValueError, match="d_model: 32 -> 16"):
        train_autoencoder(dataclasses.replace(config, d_model=16), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="past steps=1"):
        train_autoencoder(dataclasses.replace(config, steps=1), out_dir=tmp_path, progress=False)


def test_chunk_dataset_cuts_each_document():
    tokenizer = ByteTokenizer()
    ids, lengths = chunk_dataset(tokenizer, chunk_size=32, texts=["a" * 70, "bc", ""])
    assert lengths.tolist() == [32, 32, 6, 2] and ids.shape == (4, 32) and ids.dtype == torch.int64
    assert ids[2, 6:].eq(tokenizer.pad_id).all() and ids[3, :2].tolist() == [ord("b"), ord("c")]
    assert chunk_dataset(tokenizer, 32, max_chunks=2, texts=["a" * 70, "bc"])[1].tolist() == [32, 32]
    stdlib_ids, stdlib_lengths = chunk_dataset(tokenizer, 128, max_chunks=50)
    assert stdlib_ids.shape == (50, 128) and 1 <= int(stdlib_lengths.min()) <= int(stdlib_lengths.max()) <= 128


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="tokenizer"):
        dataclasses.replace(TINY, tokenizer="gpt2").validate()
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(TINY, heads=3).validate()
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_dataset(ByteTokenizer(), chunk_size=0, texts=["x"])
    with pytest.raises(ValueError, match="heads"):
        ChunkDecoder(257, 32, heads=5)
    encoder = ChunkEncoder.from_scratch(32, 1, 2, 1, 8)
    decoder = ChunkDecoder(257, 32, 1, 2, 8)
    with pytest.raises(ValueError, match="lengths must be in"):
        autoencode_loss(encoder, decoder, torch.zeros(2, 8, dtype=torch.int64), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="width"):
        decoder(torch.zeros(1, 32), torch.tensor([9]), torch.zeros(1, 9, dtype=torch.int64))


def test_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path), "--tokenizer", "bytes", "--steps", "2", "--eval-every", "1", "--d-model", "16"]
        + ["--heads", "2", "--cls-heads", "1", "--chunk-size", "16", "--max-chunks", "40", "--no-progress"]
    )
    run(args)
    assert "| 2 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "convergence.json").read_text())["config"]["d_model"] == 16
    args.d_model = 32
    with pytest.raises(SystemExit, match="another configuration"):
        run(args)
