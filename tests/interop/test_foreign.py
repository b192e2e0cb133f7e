"""NeMo 2, Megatron-LM and Megatron-Bridge checkpoint folders (issue 17), made in this run by the
real libraries from the fixture's tiny Llama (helpers/foreign_save.py): a NeMo 2 folder whose
`weights/` megatron-core 0.16.1's `dist_checkpointing.save` wrote with `module.` keys; a
Megatron-LM torch_dist iteration whose `common.pt` pickles a real `argparse.Namespace`; legacy
Megatron-LM `model_optim_rng.pt` files written by `torch.save` (args, model, optimizer and RNG
state, numpy's included) at TP2 and at PP2 (stage-local layer numbers); a torch_dist iteration laid
out as megatron-core 0.19+ does (no common.pt: the args in the DCP object common_state/); and a
hostile one.

Each is read by `inspect`, `validate` and `checksum`, and `convert --to nemo1` gives the
fixture's own TP1 tensors bit for bit (the fixture is what megatron-core loaded before saving,
and what the legacy files were cut from)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import megatron.core  # noqa: F401  (pinned in requirements.txt: missing is an error, not a skip)

from conftest import free_port

HELPER = Path(__file__).parent / "helpers" / "foreign_save.py"
FIXTURE_TP1 = "fixtures/mcore/llama/tp1/mp_rank_00/model_weights.ckpt"
FIXTURE_NEMO = "fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo"

# (folder, format, weights, iteration, optimizer, TP/PP on disk, where the config came from)
SOURCES = {
    "nemo2": ("nemo2", "torch_dist", None, False, (1, 1), "context/model.yaml"),
    "bridge": ("megatron-bridge", "torch_dist", 0, False, (1, 1), "run_config.yaml"),
    "mlm_dist": ("megatron-lm", "torch_dist", 10, False, (1, 1), "args in common.pt"),
    "mlm_v15": ("megatron-lm", "torch_dist", 10, False, (1, 1), "args in common.pt"),
    "mlm_v19": ("megatron-lm", "torch_dist", 40, False, (1, 1), "args in common_state/"),
    "mlm_legacy": ("megatron-lm", "legacy", 20, True, (2, 1), "args in mp_rank_00/model_optim_rng.pt"),
    "mlm_pp2": ("megatron-lm", "legacy", 30, True, (1, 2), "args in mp_rank_00_000/model_optim_rng.pt"),
}


@pytest.fixture(scope="module")
def folders(root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("foreign")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"]:
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr", "127.0.0.1",
           f"--master_port={free_port()}", str(HELPER), str(root), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return out


def _rank_files(nemo: Path) -> dict[str, dict]:
    with tarfile.open(nemo) as t:
        return {m.name.removeprefix("./"): torch.load(io.BytesIO(t.extractfile(m).read()), weights_only=True)
                for m in t.getmembers() if m.name.endswith("model_weights.ckpt")}


@pytest.mark.parametrize("name", list(SOURCES))
def test_read_and_convert_to_nemo1(folders, run_tool, root, tmp_path, name):
    fmt, weights, iteration, optimizer, (tp, pp), config_from = SOURCES[name]
    src = folders / name
    rep = json.loads(run_tool("inspect", src, "--json").stdout)
    s = rep["source"]
    assert (s["format"], s["weights"], s["iteration"], s["optimizer"], s["config_from"]) == \
        (fmt, weights, iteration, optimizer, config_from), s
    assert (rep["layout"]["tp_on_disk"], rep["layout"]["pp_on_disk"]) == (tp, pp)
    a = rep["architecture"]
    assert (a["num_layers"], a["hidden_size"], a["ffn_hidden_size"], a["num_attention_heads"],
            a["num_query_groups"], a["kv_channels"], a["normalization"], a["activation"],
            a["tied_embeddings"]) == (2, 64, 96, 8, 2, 8, "rmsnorm", "fast-swiglu", False), a
    assert rep["params"]["total"] == 74048
    tokenizer = {"nemo2": "context/nemo_tokenizer/tokenizer.model", "bridge": "iter_0000000/tokenizer"}
    if name in tokenizer:
        assert s["tokenizer"] == tokenizer[name]
        assert rep["vocab"]["true_vocab"] == 100, rep["vocab"]
    else:
        assert s["tokenizer"] == "/data/tokenizers/tiny/tokenizer.model"  # named by the args only
    assert json.loads(run_tool("validate", src, "--json").stdout)["valid"]

    # layout-independent checksums: the fixture's model digest (true vocabulary rows)
    digest = json.loads(run_tool("checksum", root / FIXTURE_NEMO, "--json").stdout)["model_digest"]
    extra = [] if name in tokenizer else ["--vocab-size", "100"]
    assert json.loads(run_tool("checksum", src, "--json", *extra).stdout)["model_digest"] == digest

    # to a NeMo 1 .nemo: the fixture's TP1 tensors, bit for bit
    out = tmp_path / "out.nemo"
    run_tool("convert", src, "--to", "nemo1", out)
    ours = _rank_files(out)["model_weights.ckpt"]
    ref = torch.load(root / FIXTURE_TP1, weights_only=True)
    if name == "mlm_v19":  # written without the (empty) _extra_state objects: tensors only
        ref = {k: v for k, v in ref.items() if v is not None}
        ours = {k: v for k, v in ours.items() if v is not None}
    assert list(ours) == list(ref)
    for k, v in ref.items():
        if v is None:  # an empty _extra_state
            assert ours[k] is None, k
        else:
            assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


def test_legacy_tensors_equal_torch_load(folders, run_tool, tmp_path):
    """The TP2 shards read from `model_optim_rng.pt` are torch's own load of each file's `model`."""
    out = tmp_path / "tp2.nemo"
    run_tool("convert", folders / "mlm_legacy", "--to", "nemo1", "--tp", "2", out)
    ours = _rank_files(out)
    for r in range(2):
        f = folders / f"mlm_legacy/iter_0000020/mp_rank_{r:02d}/model_optim_rng.pt"
        theirs = torch.load(f, weights_only=False)["model"]  # our own file: trusted
        mine = ours[f"mp_rank_{r:02d}/model_weights.ckpt"]
        assert sorted(mine) == sorted("model." + k for k in theirs)
        for k, v in theirs.items():
            assert (v is None and mine["model." + k] is None) or torch.equal(mine["model." + k], v), (r, k)


def test_hostile_model_optim_rng_is_refused(folders, run_tool):
    for cmd in (["inspect"], ["checksum"], ["convert", "--to", "nemo1"]):
        args = [*cmd, folders / "hostile"] + ([folders / "x.nemo"] if cmd[0] == "convert" else [])
        p = run_tool(*args, check=False)
        assert p.returncode == 2, (cmd, p.stderr)
        assert "refusing global posix.system" in p.stderr, p.stderr
    assert not (folders / "x.nemo").exists()


def test_unknown_folders_say_what_differs(folders, run_tool, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latest_checkpointed_iteration.txt").write_text("7")
    p = run_tool("inspect", bad, check=False)
    assert p.returncode == 2 and "iter_0000007/, which does not exist" in p.stderr, p.stderr
    (bad / "latest_checkpointed_iteration.txt").write_text("seven")
    p = run_tool("inspect", bad, check=False)
    assert p.returncode == 2 and "expected an iteration number or `release`" in p.stderr, p.stderr
    # a metadata.json from a later megatron-core: refused by what differs
    import shutil
    for text, what in [('{"sharded_backend": "torch_dist", "sharded_backend_version": 2}', "sharded_backend_version 2"),
                       ('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "zarr", '
                        '"common_backend_version": 1}', 'common_backend "zarr"'),
                       ('{"sharded_backend": "torch_dist2"}', 'unsupported sharded_backend Some("torch_dist2")')]:
        later = tmp_path / "later"
        shutil.rmtree(later, ignore_errors=True)
        shutil.copytree(folders / "mlm_dist", later)
        (later / "iter_0000010/metadata.json").write_text(text)
        p = run_tool("inspect", later, check=False)
        assert p.returncode == 2 and what in p.stderr, (what, p.stderr)


def _dcp_as_dict(weights: Path, out: Path) -> dict:
    """torch's own reading of a distributed checkpoint folder (every tensor and object)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(weights), str(out))
    return torch.load(out, weights_only=False)  # written just now by torch from our test data


def test_nemo2_round_trip_is_byte_identical(folders, run_tool, tmp_path):
    """NeMo 2 (megatron-core's save) -> .nemo -> NeMo 2: every tensor and object of weights/
    equal by torch's own reading; context/ and common.pt byte for byte."""
    src = folders / "nemo2"
    run_tool("convert", src, "--to", "nemo1", tmp_path / "n1.nemo")
    run_tool("convert", tmp_path / "n1.nemo", "--to", "nemo2", tmp_path / "back")
    # the .nemo lost context/; convert the NeMo 2 folder itself too, which keeps it
    run_tool("convert", src, "--to", "nemo2", tmp_path / "direct")
    theirs = _dcp_as_dict(src / "weights", tmp_path / "theirs.pt")
    for out in ("back", "direct"):
        ours = _dcp_as_dict(tmp_path / out / "weights", tmp_path / f"{out}.pt")
        assert sorted(ours) == sorted(theirs), out
        for k, v in theirs.items():
            if isinstance(v, torch.Tensor):
                assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), (out, k)
            else:
                assert ours[k] == v, (out, k)
    for rel in ("context/model.yaml", "context/io.json", "context/nemo_tokenizer/tokenizer.model",
                "weights/common.pt"):
        assert (tmp_path / "direct" / rel).read_bytes() == (src / rel).read_bytes(), rel
    # from a .nemo: model.yaml generated, read back to the same architecture and tokenizer
    rep = json.loads(run_tool("inspect", tmp_path / "back", "--json").stdout)
    assert rep["source"]["format"] == "nemo2" and rep["vocab"]["true_vocab"] == 100
    assert rep["architecture"] == json.loads(run_tool("inspect", src, "--json").stdout)["architecture"]


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_loads_our_nemo2_weights(folders, run_tool, root, tmp_path, tp):
    """megatron-core's dist_checkpointing.load reads our NeMo 2 weights/ (from the fixture's
    .nemo, and from the Megatron-LM legacy TP2 folder) at TP1 and TP2 with the same logits, bit
    for bit, as its own torch_dist checkpoint of the same weights, in the same processes."""
    from conftest import mcore_logits

    run_tool("convert", root / FIXTURE_NEMO, "--to", "nemo2", tmp_path / "from_nemo1")
    run_tool("convert", folders / "mlm_legacy", "--to", "nemo2", tmp_path / "from_mlm")
    ckpts = [root / "fixtures/mcore/llama/dcp_tp1", tmp_path / "from_nemo1/weights",
             tmp_path / "from_mlm/weights", folders / "nemo2/weights"]
    theirs, *ours = mcore_logits(root, ckpts, tp, tmp_path / "logits.pt", root / FIXTURE_TP1)
    assert theirs.shape == (2, 16, 128)
    for name, o in zip(["from .nemo", "from Megatron-LM", "megatron-core's NeMo 2"], ours):
        assert torch.equal(o, theirs), (name, tp, (o - theirs).abs().max())


def _mlm_models(folder: Path) -> dict[str, tuple]:
    """rank folder -> (args, iteration, model) of each model_optim_rng.pt, loaded as Megatron-LM
    loads it (weights_only, with megatron-core's safe globals registered by its import)."""
    out = {}
    for f in sorted(folder.glob("*/mp_rank_*/model_optim_rng.pt")):
        d = torch.load(f, weights_only=True)
        assert d["checkpoint_version"] == 3.0
        out[f.parent.name] = (d["args"], d["iteration"], d["model"])
    return out


def _same_models(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for rank, (_, _, m) in theirs.items():
        mine = ours[rank][2]
        assert list(mine) == list(m), rank
        for k, v in m.items():
            assert (v is None and mine[k] is None) or torch.equal(mine[k], v), (rank, k)


def test_megatron_lm_output_and_reshard(folders, run_tool, root, tmp_path):
    """`reshard` of a Megatron-LM folder writes a Megatron-LM folder: TP2 -> PP2 gives exactly the
    stage files built independently (stage-local layer numbers), PP2 -> TP2 exactly the TP2
    files; each loads with torch's weights_only and megatron-core's safe globals, with its args."""
    run_tool("reshard", folders / "mlm_legacy", tmp_path / "pp2", "--tp", "1", "--pp", "2")
    assert (tmp_path / "pp2/latest_checkpointed_iteration.txt").read_text() == "20"
    ours = _mlm_models(tmp_path / "pp2")
    _same_models(ours, _mlm_models(folders / "mlm_pp2"))
    args = ours["mp_rank_00_001"][0]
    assert type(args).__name__ == "Namespace" and ours["mp_rank_00_001"][1] == 20
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.num_layers,
            args.hidden_size, args.num_query_groups, args.swiglu, args.untie_embeddings_and_output_weights,
            args.padded_vocab_size, args.normalization) == (1, 2, 2, 64, 2, True, True, 128, "RMSNorm")
    run_tool("convert", folders / "mlm_pp2", "--to", "mlm", "--tp", "2", tmp_path / "tp2")
    _same_models(_mlm_models(tmp_path / "tp2"), _mlm_models(folders / "mlm_legacy"))
    # to a .nemo and back: the same files' models, the optimizer state dropped with a warning
    p = run_tool("convert", folders / "mlm_legacy", "--to", "nemo1", "--tp", "2", tmp_path / "x.nemo", "--json")
    assert "optimizer state dropped (weights only)" in json.loads(p.stdout)["warnings"]
    run_tool("convert", tmp_path / "x.nemo", "--to", "mlm", "--tp", "2", tmp_path / "back")
    _same_models(_mlm_models(tmp_path / "back"), _mlm_models(folders / "mlm_legacy"))

    # a .nemo to Megatron-LM: release/, the tokenizer beside the ranks, read back whole
    run_tool("convert", root / FIXTURE_NEMO, "--to", "mlm", tmp_path / "from_nemo")
    assert (tmp_path / "from_nemo/latest_checkpointed_iteration.txt").read_text() == "release"
    assert (tmp_path / "from_nemo/release/tokenizer/tokenizer.model").read_bytes() == \
        (root / "fixtures/mcore/tokenizer/tokenizer.model").read_bytes()
    rep = json.loads(run_tool("inspect", tmp_path / "from_nemo", "--json").stdout)
    assert rep["source"]["tokenizer"] == "release/tokenizer" and rep["vocab"]["true_vocab"] == 100
    digest = json.loads(run_tool("checksum", root / FIXTURE_NEMO, "--json").stdout)["model_digest"]
    assert json.loads(run_tool("checksum", tmp_path / "from_nemo", "--json").stdout)["model_digest"] == digest


def test_hf_to_nemo2_and_megatron_lm_and_back(run_tool, root, tmp_path):
    """HF -> NeMo 2 -> HF and HF -> Megatron-LM TP2 -> HF give transformers' own
    model.safetensors back byte for byte, the tokenizer file too."""
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(root / "fixtures/mcore/llama/hf", hf)
    shutil.copy(root / "fixtures/mcore/tokenizer/tokenizer.model", hf / "tokenizer.model")
    run_tool("convert", "--from", "hf", hf, "--to", "nemo2", tmp_path / "n2")
    run_tool("convert", "--from", "hf", hf, "--to", "mlm", "--tp", "2", tmp_path / "mlm")
    assert sorted(p.name for p in (tmp_path / "mlm/release").iterdir()) == ["mp_rank_00", "mp_rank_01", "tokenizer"]
    for src in ("n2", "mlm"):
        run_tool("convert", tmp_path / src, "--to", "hf", tmp_path / f"{src}_hf")
        for f in ("model.safetensors", "tokenizer.model"):
            assert (tmp_path / f"{src}_hf" / f).read_bytes() == (hf / f).read_bytes(), (src, f)


def test_eval_and_diff_read_every_source(folders, run_tool, root, tmp_path):
    """`eval --tokens` gives the fixture .nemo's logits bit for bit from each folder (same
    weights, same engine), at TP1 and TP2; `diff` finds no tensor differing."""
    import numpy as np
    from test_eval import fixture_tokens, run_eval

    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps(fixture_tokens().tolist()))
    for tp in (1, 2):
        ref = tmp_path / f"ref{tp}.npy"
        run_eval(tp, root / FIXTURE_NEMO, "--tokens", tok, "--logits-out", ref)
        for name in ("nemo2", "mlm_v19", "mlm_legacy", "mlm_pp2"):
            out = tmp_path / f"{name}{tp}.npy"
            run_eval(tp, folders / name, "--tokens", tok, "--logits-out", out)
            got, want = np.load(out), np.load(ref)
            # NeMo 2's make_vocab_size_divisible_by 128 pads to 256 rows at TP2 (zero rows)
            n = want.shape[-1]
            assert np.array_equal(got[..., :n], want), (name, tp)
            assert not got[..., n:].any(), (name, tp)
    for name in SOURCES:
        d = json.loads(run_tool("diff", folders / name, root / FIXTURE_NEMO, "--json", "--vocab-size", "100",
                                check=False).stdout)
        assert (d["compared"], d["only_in_a"], d["only_in_b"], d["max_abs_diff"], d["tensors"]) == \
            (15, [], [], 0.0, []), (name, d)
