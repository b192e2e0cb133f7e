//! Hostile and broken inputs through the real binary: each gives a clear
//! one-line error naming the member, exit code 2, no panic, and nothing is
//! written at (or beside) the output path.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::roundtrip::fixture;

fn tool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nemo-tool"))
}

/// A raw ustar header (for members our own writer refuses to write).
fn raw_header(name: &str, size: u64, typeflag: u8, link: &str) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..265].copy_from_slice(b"ustar\x0000");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

/// A tar holding the given (name, bytes) regular files.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        out.extend_from_slice(&raw_header(name, data.len() as u64, b'0', ""));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn config() -> Vec<u8> {
    std::fs::read(fixture("configs/tiny_llama.yaml")).unwrap()
}

fn tp1_weights() -> Vec<u8> {
    std::fs::read(fixture("mcore/llama/tp1/mp_rank_00/model_weights.ckpt")).unwrap()
}

/// Runs `inspect` and `pack` on `input`; both must fail with exit 2 and an
/// error containing every `needle`, and `pack` must leave no file behind.
fn assert_refused(input: &Path, needles: &[&str]) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.nemo");
    for args in [
        vec!["inspect".into(), input.to_path_buf()],
        vec!["pack".into(), input.to_path_buf(), out.clone()],
    ] {
        let o = tool().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("nemo-tool: "), "{err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "one-line error expected: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: expected {n:?} in: {err}");
        }
    }
    let left: Vec<PathBuf> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "pack left files behind: {left:?}");
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn truncated_tar() {
    let d = tempfile::tempdir().unwrap();
    let full = std::fs::read(fixture("mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap();
    let p = write(d.path(), "cut.nemo", &full[..full.len() / 2]);
    assert_refused(&p, &["truncated", "model_weights.ckpt"]);
}

#[test]
fn truncated_zip_member() {
    let d = tempfile::tempdir().unwrap();
    let w = tp1_weights();
    let cut = &w[..w.len() - 100];
    let p = write(
        d.path(),
        "m.nemo",
        &tar_of(&[
            ("./model_config.yaml", &config()),
            ("./model_weights.ckpt", cut),
        ]),
    );
    assert_refused(&p, &["model_weights.ckpt"]);
}

#[test]
fn zip_record_size_past_the_end() {
    let d = tempfile::tempdir().unwrap();
    let mut w = tp1_weights();
    // Central directory entry of the first record: bump its compressed and
    // uncompressed sizes far past the end of the stream.
    let cd = w.windows(4).position(|x| x == b"PK\x01\x02").unwrap();
    w[cd + 20..cd + 28].copy_from_slice(&[0xff, 0xff, 0xff, 0x0f, 0xff, 0xff, 0xff, 0x0f]);
    let p = write(
        d.path(),
        "m.nemo",
        &tar_of(&[
            ("./model_config.yaml", &config()),
            ("./model_weights.ckpt", &w),
        ]),
    );
    assert_refused(&p, &["model_weights.ckpt", "data.pkl"]);
}

#[test]
fn pickle_calling_os_system() {
    // {'x': os.system('echo pwned')} as a protocol-2 pickle inside a real zip.
    let mut pkl = vec![0x80, 2];
    pkl.extend_from_slice(b"}X\x01\x00\x00\x00x");
    pkl.extend_from_slice(b"cos\nsystem\nX\x0a\x00\x00\x00echo pwned\x85R");
    pkl.extend_from_slice(b"s.");
    let mut zip = Vec::new();
    let mut zw = nemo_tool::formats::torch::zip::ZipWriter::new(&mut zip, "archive");
    zw.add("data.pkl", &pkl).unwrap();
    zw.add("version", b"3\n").unwrap();
    zw.finish().unwrap();
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "m.nemo",
        &tar_of(&[
            ("./model_config.yaml", &config()),
            ("./model_weights.ckpt", &zip),
        ]),
    );
    assert_refused(&p, &["model_weights.ckpt", "os.system"]);
}

#[test]
fn parent_dir_member() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "m.nemo",
        &tar_of(&[("./model_config.yaml", &config()), ("../x", b"evil")]),
    );
    assert_refused(&p, &["../x"]);
    assert!(!d.path().parent().unwrap().join("x").exists());
}

#[test]
fn symlink_member() {
    let d = tempfile::tempdir().unwrap();
    let mut t = raw_header("./model_weights.ckpt", 0, b'2', "/etc/passwd").to_vec();
    t.extend_from_slice(&tar_of(&[("./model_config.yaml", &config())]));
    let p = write(d.path(), "m.nemo", &t);
    assert_refused(&p, &["model_weights.ckpt", "link"]);
}

#[test]
fn gzip_cut_short() {
    let d = tempfile::tempdir().unwrap();
    let tar = std::fs::read(fixture("mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, &tar).unwrap();
    let gz = enc.finish().unwrap();
    let p = write(d.path(), "m.nemo", &gz[..gz.len() / 2]);
    assert_refused(&p, &["gzip"]);
}

#[test]
fn missing_input_and_existing_output() {
    let d = tempfile::tempdir().unwrap();
    assert_refused(&d.path().join("nope.nemo"), &["nope.nemo"]);
    let out = write(d.path(), "out.nemo", b"keep");
    let o = tool()
        .args([
            "pack".as_ref(),
            fixture("mcore/llama/nemo/tiny_llama_tp1.nemo").as_os_str(),
            out.as_os_str(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
}

/// An I/O error names its OS cause once, though our error types put their
/// source in their own message and expose it as `source()` too.
#[test]
fn an_io_error_names_its_cause_once() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nope.nemo");
    let out_in_missing_dir = d.path().join("no/such/dir/out.nemo");
    let fixture = fixture("mcore/llama/nemo/tiny_llama_tp1.nemo");
    for args in [
        vec!["inspect".as_ref(), missing.as_os_str()],
        vec!["checksum".as_ref(), missing.as_os_str()],
        vec![
            "pack".as_ref(),
            fixture.as_os_str(),
            out_in_missing_dir.as_os_str(),
        ],
        vec![
            "reshard".as_ref(),
            fixture.as_os_str(),
            out_in_missing_dir.as_os_str(),
            "--tp".as_ref(),
            "2".as_ref(),
        ],
    ] {
        let o = tool().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(
            err.matches("(os error 2)").count(),
            1,
            "{args:?}: the cause should appear once in: {err}"
        );
    }
}
