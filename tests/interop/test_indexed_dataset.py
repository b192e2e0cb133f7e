"""Megatron indexed datasets (.bin/.idx): what `nemo-tool data make` writes is read by megatron-core's
own `IndexedDataset`, and what megatron-core's `IndexedDatasetBuilder` writes is read by nemo-tool."""

from __future__ import annotations

import json
import warnings

import numpy
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

DOCS = [[5, 6, 7], [1], [99, 98, 97, 96, 95], list(range(60000, 60010))]


def test_megatron_reads_what_we_write(run_tool, tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    prefix = tmp_path / "ours"
    run_tool("data", "make", "--input", src, "--output-prefix", prefix, "--vocab-size", "64000", "--append-eod", "2")
    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(DOCS)
    assert ds.index.dtype == numpy.uint16
    for i, d in enumerate(DOCS):
        assert ds[i].tolist() == d + [2]
    assert ds.document_indices.tolist() == list(range(len(DOCS) + 1))
    # i32 when the vocabulary does not fit u16, as Megatron's preprocessing picks.
    run_tool("data", "make", "--input", src, "--output-prefix", tmp_path / "big", "--vocab-size", "128256")
    assert IndexedDataset(str(tmp_path / "big")).index.dtype == numpy.int32


def test_we_read_what_megatron_writes(run_tool, tmp_path):
    prefix = tmp_path / "theirs"
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=numpy.int32)
    for d in DOCS:
        b.add_item(torch.tensor(d))
        b.end_document()
    b.finalize(str(prefix) + ".idx")
    info = json.loads(run_tool("data", "info", prefix, "--json").stdout)
    assert info["sequences"] == len(DOCS)
    assert info["documents"] == len(DOCS)
    assert info["tokens"] == sum(len(d) for d in DOCS)
    assert info["token_type"] == "i32"
    dumped = [json.loads(line) for line in run_tool("data", "dump", prefix).stdout.splitlines()]
    assert dumped == DOCS


def test_bad_index_is_a_clear_error(run_tool, tmp_path):
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "x.bin").write_bytes(b"")
    proc = run_tool("data", "info", tmp_path / "x", check=False)
    assert proc.returncode == 2
    assert "x.idx" in proc.stderr and "MMIDIDX" in proc.stderr
