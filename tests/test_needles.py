"""Ranker training on key-value haystacks and the needle evaluation, at toy sizes with a tiny encoder."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from memory_utils import FILLER_SENTENCES, tiny_encoder

from mllm.training.needles import NeedleConfig, evaluate_needles, train_task_rankers, write_reports

TINY = NeedleConfig(
    chunk_size=16,
    fanout=4,
    page_tokens=120,
    train_haystacks=2,
    train_tokens=800,
    train_pairs=8,
    steps=16,
    lr=3e-3,
    batch_size=16,
    sizes=(300, 1200),
    depths=(0.0, 0.5, 1.0),
    min_queries=6,
    max_passkey_seeds=2,
    kv_pairs=6,
)


@pytest.fixture(autouse=True, scope="module")
def small_filler():
    """A few hundred synthetic sentences instead of the standard library's (seconds to parse)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mllm.training.needles.filler_sentences", lambda: FILLER_SENTENCES)
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("needles")
    encoder = tiny_encoder(d_model=16)
    state, log = train_task_rankers(encoder, TINY, out_dir=out, progress=False)
    return encoder, out, state, log


def test_ranker_training_lowers_the_loss_of_every_pair(trained):
    _, _, _, log = trained
    assert sorted(log["pairs"]) == list(range(1, log["levels"]))  # every pair, bottom up
    for rows in log["pairs"].values():
        losses = [row["loss"] for row in rows]
        assert sum(losses[-4:]) < sum(losses[:4])
    assert set(log["before"]) == set(log["after"]) == set(TINY.ts)


def test_a_finished_run_resumes_without_retraining(trained):
    encoder, out, state, log = trained
    again_state, again_log = train_task_rankers(encoder, TINY, out_dir=out, progress=False)
    assert again_log["pairs"] == log["pairs"]
    for name in ("ranker", "level_encoders"):
        for key, value in state[name].items():
            torch.testing.assert_close(again_state[name][key], value)
    with pytest.raises(ValueError, match="another config"):
        train_task_rankers(encoder, dataclasses.replace(TINY, steps=3), out_dir=out, progress=False)


def test_evaluation_rows_and_reports(trained, tmp_path):
    encoder, _, state, log = trained
    rows = evaluate_needles(encoder, TINY, state, progress=False)
    cells = {(r["task"], r["tokens"], r["depth"], r["t"], r["weights"]) for r in rows}
    assert len(cells) == len(rows)
    for task in ("passkey", "kv"):
        for tokens in TINY.sizes:
            for t in TINY.ts:
                for weights in ("untrained", "trained"):
                    line = [
                        r for r in rows if (r["task"], r["tokens"], r["t"], r["weights"]) == (task, tokens, t, weights)
                    ]
                    assert line and sum(r["queries"] for r in line) >= TINY.min_queries
                    assert all(0.0 <= r["hits"] <= 1.0 for r in line)
    passkey_depths = {r["depth"] for r in rows if r["task"] == "passkey"}
    assert passkey_depths == set(TINY.depths)
    files = write_reports(rows, tmp_path, log, {"note": "test"})
    assert "**passkey, t=2**" in Path(files["markdown"]).read_text()
    assert json.loads(Path(files["json"]).read_text())["rows"] == rows


def test_a_beam_over_every_leaf_finds_every_needle():
    config = dataclasses.replace(TINY, ts=(10_000,), sizes=(500,))
    rows = evaluate_needles(tiny_encoder(d_model=16), config, progress=False)
    assert rows and all(r["hits"] == 1.0 for r in rows)
