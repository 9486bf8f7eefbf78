"""The passkey LM experiment at toy size: both LMs train, the reports are written, resume is exact."""

import dataclasses
import json

import pytest
from memory_utils import FILLER_SENTENCES, tiny_encoder

from mllm.training.passkey_lm import PasskeyLMConfig, train_passkey_lm

TINY = PasskeyLMConfig(
    memory_tokens=200,
    page_tokens=40,
    train_examples=16,
    test_examples=4,
    per_filler=8,
    chunk_size=16,
    fanout=4,
    t=2,
    layers=1,
    width=32,
    heads=2,
    steps=8,
    batch_size=8,
    lr=3e-3,
    eval_every=4,
)


@pytest.fixture(autouse=True, scope="module")
def small_filler():
    """A few hundred synthetic sentences instead of the standard library's (seconds to parse)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mllm.training.passkey_lm.filler_sentences", lambda: FILLER_SENTENCES)
        yield


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder(d_model=16)


@pytest.fixture(scope="module")
def straight(encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("passkey_lm")
    return out, train_passkey_lm(encoder, TINY, out_dir=out, resume=False, progress=False)


def test_both_lms_learn_and_the_reports_are_written(straight):
    out, report = straight
    rows = report["rows"]
    assert [r["step"] for r in rows] == [4, 8]
    for name in ("loss_memory", "loss_bare"):
        assert rows[-1][name] < rows[0][name]  # mean training loss of steps 5-8 below that of 1-4
    assert all(0.0 <= r[key] <= 1.0 for r in rows for key in ("acc_memory", "acc_bare", "acc_memory_train"))
    assert report["memory_slots"] > TINY.t  # nodes of more than one level
    assert json.loads((out / "passkey_lm.json").read_text())["rows"] == rows
    assert "| 8 |" in (out / "passkey_lm.md").read_text() and (out / "passkey_lm.png").stat().st_size > 0


def test_resume_continues_exactly(encoder, straight, tmp_path):
    train_passkey_lm(encoder, dataclasses.replace(TINY, steps=4), out_dir=tmp_path, resume=False, progress=False)
    resumed = train_passkey_lm(encoder, TINY, out_dir=tmp_path, progress=False)  # steps 5-8 only
    assert resumed["rows"] == straight[1]["rows"]
    with pytest.raises(ValueError, match="another config"):
        train_passkey_lm(encoder, dataclasses.replace(TINY, lr=1e-2), out_dir=tmp_path, progress=False)
