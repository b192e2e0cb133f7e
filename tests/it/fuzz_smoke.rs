//! The fuzz smoke test (stable, no nightly): every cargo-fuzz target's
//! committed seed corpus (`fuzz/seeds/<target>/`) and regression inputs
//! (`fuzz/regressions/<target>/`, crashes found by fuzzing) go through the
//! same entry points as `fuzz/fuzz_targets/*.rs`, then a few thousand
//! deterministic mutations of the seeds (bit flips, interesting values,
//! truncation, splices). A panic fails the test; so does a runaway.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nemo_tool::testkit::hostile::TARGETS;

/// Mutations per target (spread over its seeds).
const MUTATIONS: usize = 3000;

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target)
}

fn files(d: &Path) -> Vec<Vec<u8>> {
    let Ok(rd) = std::fs::read_dir(d) else {
        return vec![];
    };
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    paths
        .iter()
        .filter(|p| p.is_file())
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// One mutation of `seed`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut d = seed.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = d.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = [0u8, 0xff, 0x7f, 0x80, 0x01, b'.', b'('][rng.below(7)];
            }
            2 if len > 8 => {
                // a large little-endian integer where a length or offset may be
                let i = rng.below(len - 8);
                let v: u64 = [u64::MAX, 1 << 40, 0x7fff_ffff, 0xffff_ffff, 1 << 31][rng.below(5)];
                let n = [2usize, 4, 8][rng.below(3)];
                d[i..i + n].copy_from_slice(&v.to_le_bytes()[..n]);
            }
            3 if len > 0 => d.truncate(rng.below(len)),
            4 if len > 2 => {
                // duplicate a slice elsewhere
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let chunk = d[a..b].to_vec();
                let at = rng.below(len);
                d.splice(at..at, chunk);
            }
            5 if len > 2 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                d.drain(a..b);
            }
            _ => {
                let i = rng.below(len + 1);
                d.insert(i, rng.next() as u8);
            }
        }
    }
    d
}

#[test]
fn seeds_regressions_and_mutations_never_panic() {
    let started = Instant::now();
    for (name, target) in TARGETS {
        let seeds = files(&dir("seeds", name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name} is empty");
        for s in seeds.iter().chain(files(&dir("regressions", name)).iter()) {
            target(s);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        let t0 = Instant::now();
        for i in 0..MUTATIONS {
            let seed = &seeds[i % seeds.len()];
            let input = mutate(seed, &mut rng);
            let one = Instant::now();
            target(&input);
            assert!(
                one.elapsed() < Duration::from_secs(10),
                "{name}: mutation {i} took {:?} (a hang?)",
                one.elapsed()
            );
        }
        eprintln!(
            "fuzz smoke {name}: {MUTATIONS} mutations in {:?}",
            t0.elapsed()
        );
    }
    eprintln!("fuzz smoke: total {:?}", started.elapsed());
}

#[test]
fn mutations_are_deterministic() {
    let (mut a, mut b) = (Rng(7), Rng(7));
    let seed = b"0123456789abcdef".to_vec();
    assert_eq!(mutate(&seed, &mut a), mutate(&seed, &mut b));
}
