//! Archives written by `TarWriter` must read back identically through our
//! reader and through Python's `tarfile` (what NeMo uses), and must be the
//! very bytes `tarfile.add(dir, arcname=".")` writes for the same folder.
//!
//! Python is found as `$NEMO_TOOL_PYTHON`, the repo's `.venv`, or `python3`;
//! without one these checks are skipped with a note (our reader still runs).

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use nemo_tool::formats::archive::{Archive, ArchiveKind, MemberKind};
use nemo_tool::formats::tar_write::{entry_header, EntryKind, TarWriter};
use sha2::{Digest, Sha256};

fn python() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NEMO_TOOL_PYTHON") {
        candidates.push(p.into());
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    candidates.push("python3".into());
    candidates.into_iter().find(|p| {
        Command::new(p)
            .arg("-c")
            .arg("import tarfile")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/test_tar.py")
}

/// Python's view: (name, type, size, sha256 or "") per member.
fn python_list(py: &Path, archive: &Path) -> Vec<(String, String, u64, String)> {
    let out = Command::new(py)
        .arg(script())
        .arg("list")
        .arg(archive)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["type"].as_str().unwrap().to_string(),
                m["size"].as_u64().unwrap(),
                m["sha256"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Our view, in the same shape (names as Python prints them: `./x`, root `.`).
fn our_list(a: &Archive) -> Vec<(String, String, u64, String)> {
    let mut v = vec![(".".to_string(), "dir".to_string(), 0, String::new())];
    for m in a.members() {
        let (kind, sha) = match m.kind {
            MemberKind::Dir => ("dir", String::new()),
            MemberKind::File if m.size > 64 << 20 => ("file", String::new()),
            MemberKind::File => (
                "file",
                hex::encode(Sha256::digest(a.read(&m.name).unwrap().as_slice())),
            ),
        };
        v.push((format!("./{}", m.name), kind.to_string(), m.size, sha));
    }
    v
}

/// A folder shaped like an extracted dist-ckpt `.nemo`, with a >100-byte
/// member path, a non-ASCII name and an empty file.
fn make_tree(root: &Path) {
    let long_dir = root
        .join("model_weights")
        .join("model.decoder.layers.self_attention.linear_qkv.layer_norm_weight._extra_state.shard_0_of_8");
    fs::create_dir_all(&long_dir).unwrap();
    fs::write(long_dir.join(".zarray"), br#"{"shape": [2, 64]}"#).unwrap();
    fs::write(long_dir.join("0.0"), vec![3u8; 1000]).unwrap();
    fs::write(root.join("model_weights/common.pt"), b"PK\x03\x04").unwrap();
    fs::write(root.join("model_config.yaml"), b"mcore_gpt: true\n").unwrap();
    fs::write(root.join("tokenizer_\u{e9}.model"), b"").unwrap();
    fs::write(root.join("model_weights.a"), b"sorts after the dir").unwrap();
}

/// Packs a folder the way `nemo-tool` will: the folder reader's order is
/// Python's `tarfile.add` order.
fn pack(folder: &Archive, out: impl Write) {
    let mut w = TarWriter::new(out);
    w.append_dir(".").unwrap();
    for m in folder.members() {
        match m.kind {
            MemberKind::Dir => w.append_dir(&m.name).unwrap(),
            MemberKind::File => {
                let bytes = folder.read(&m.name).unwrap();
                w.append_file(&m.name, m.size, bytes.as_slice()).unwrap();
            }
        }
    }
    w.finish().unwrap();
}

#[test]
fn written_tar_matches_python_tarfile() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_tree(&src);
    let folder = Archive::open(&src).unwrap();
    assert_eq!(folder.kind(), ArchiveKind::Folder);
    assert!(folder.members().iter().any(|m| m.name.len() > 100));

    let ours = dir.path().join("ours.nemo");
    pack(&folder, fs::File::create(&ours).unwrap());
    let back = Archive::open(&ours).unwrap();
    assert_eq!(our_list(&back), our_list(&folder));

    let Some(py) = python() else {
        assert!(
            std::env::var_os("NEMO_TOOL_STRICT").is_none(),
            "NEMO_TOOL_STRICT is set but no python was found"
        );
        eprintln!("note: no python with tarfile found; skipping the Python checks");
        return;
    };
    assert_eq!(python_list(&py, &ours), our_list(&folder));

    let theirs = dir.path().join("theirs.nemo");
    let status = Command::new(&py)
        .arg(script())
        .arg("make")
        .arg(&src)
        .arg(&theirs)
        .status()
        .unwrap();
    assert!(status.success());
    let (a, b) = (fs::read(&ours).unwrap(), fs::read(&theirs).unwrap());
    assert_eq!(a.len(), b.len());
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "our tar differs from Python's");
}

#[test]
fn member_over_8_gib_is_read_by_python() {
    // A sparse file: the header says 9 GiB, the data is a hole, so writing
    // and reading cost only the headers.
    let nine: u64 = 9 << 30;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.nemo");
    let mut f = fs::File::create(&path).unwrap();
    let mut w = TarWriter::new(&mut f);
    w.append_dir("").unwrap();
    f.write_all(&entry_header("model_weights.ckpt", EntryKind::File, nine, 0).unwrap())
        .unwrap();
    f.seek(SeekFrom::Current(nine as i64)).unwrap();
    let mut w = TarWriter::new(&mut f);
    w.append_file("model_config.yaml", 5, &b"a: 1\n"[..])
        .unwrap();
    w.finish().unwrap();
    drop(f);

    let a = Archive::open(&path).unwrap();
    assert_eq!(a.get("model_weights.ckpt").unwrap().size, nine);
    let expected = our_list(&a);
    assert_eq!(
        expected[1],
        (
            "./model_weights.ckpt".into(),
            "file".into(),
            nine,
            String::new()
        )
    );

    let Some(py) = python() else {
        assert!(
            std::env::var_os("NEMO_TOOL_STRICT").is_none(),
            "NEMO_TOOL_STRICT is set but no python was found"
        );
        eprintln!("note: no python with tarfile found; skipping the Python checks");
        return;
    };
    assert_eq!(python_list(&py, &path), expected);
}
