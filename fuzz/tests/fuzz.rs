//! The stable fuzz runner: every target over its committed corpus
//! (`corpus/TARGET/`), then over mutations of it from a fixed seed,
//! bounded by count and time so each target takes at most ~2.5 s in CI.
//!
//! `SKIFF_FUZZ_CASES=N` runs N mutated inputs per target (no time bound
//! unless `SKIFF_FUZZ_SECONDS` is also set); `SKIFF_FUZZ_SECONDS=S` runs
//! for S seconds; `SKIFF_FUZZ_SEED` changes the seed. An input that panics
//! is printed as hex and written to `target/tmp/fuzz-crashes/`, ready to be
//! copied into the corpus.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Mutated inputs per target in CI, if time allows.
const DEFAULT_CASES: u64 = 5_000;
/// Time per target in CI, corpus included.
const DEFAULT_TIME: Duration = Duration::from_millis(2_500);
const DEFAULT_SEED: u64 = 0x5c1f_f017;
/// Longest mutated input.
const MAX_LEN: usize = 64 * 1024;

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("no corpus at {}: {e}", dir.display()))
        .map(|item| item.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read a corpus file");
            (p, bytes)
        })
        .collect()
}

/// Runs one input; on a panic prints it, saves it and fails the test.
fn check(target: &str, run: fn(&[u8]), input: &[u8], origin: &str) {
    if catch_unwind(AssertUnwindSafe(|| run(input))).is_ok() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes");
    std::fs::create_dir_all(&dir).expect("create the crash directory");
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let file = dir.join(format!("{target}-{hash:016x}"));
    std::fs::write(&file, input).expect("save the crashing input");
    let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
    panic!(
        "{target} panicked on {origin} ({} bytes), saved as {}\nhex: {hex}",
        input.len(),
        file.display()
    );
}

/// One mutation of a corpus entry: bit flips, byte changes, inserts,
/// deletes, duplicated runs, splices with another entry, boundary values.
fn mutate(rng: &mut fastrand::Rng, corpus: &[(PathBuf, Vec<u8>)]) -> Vec<u8> {
    let mut data = corpus[rng.usize(..corpus.len())].1.clone();
    for _ in 0..rng.usize(1..=4) {
        let len = data.len();
        match rng.u8(0..8) {
            0 if len > 0 => {
                let i = rng.usize(..len);
                data[i] ^= 1 << rng.u8(0..8);
            }
            1 if len > 0 => {
                let i = rng.usize(..len);
                data[i] = rng.u8(..);
            }
            2 => {
                let i = rng.usize(..=len);
                data.insert(i, rng.u8(..));
            }
            3 if len > 0 => {
                let i = rng.usize(..len);
                let n = rng.usize(1..=(len - i).min(16));
                data.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.usize(..len);
                let n = rng.usize(1..=(len - i).min(64));
                let run = data[i..i + n].to_vec();
                let at = rng.usize(..=len);
                data.splice(at..at, run);
            }
            5 => {
                let other = &corpus[rng.usize(..corpus.len())].1;
                let cut = rng.usize(..=len);
                let from = rng.usize(..=other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            6 if len > 0 => {
                let i = rng.usize(..len);
                let value = [0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'\n', b'/', b'.', b':'];
                data[i] = value[rng.usize(..value.len())];
            }
            7 if len >= 8 => {
                let i = rng.usize(..=len - 8);
                let value: u64 = match rng.u8(0..4) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => u64::from(u32::MAX),
                    _ => rng.u64(..),
                };
                data[i..i + 8].copy_from_slice(&value.to_le_bytes());
            }
            _ => {}
        }
    }
    data.truncate(MAX_LEN);
    data
}

fn run(target: &str) {
    let (_, run) = skiff_fuzz::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let start = Instant::now();
    let corpus = corpus(target);
    assert!(!corpus.is_empty(), "the corpus of {target} is empty");
    for (path, input) in &corpus {
        check(target, *run, input, &path.display().to_string());
    }
    let cases = env_number("SKIFF_FUZZ_CASES");
    let seconds = env_number("SKIFF_FUZZ_SECONDS");
    let (cases, deadline) = match (cases, seconds) {
        (None, None) => (DEFAULT_CASES, Some(start + DEFAULT_TIME)),
        (Some(n), None) => (n, None),
        (n, Some(s)) => (n.unwrap_or(u64::MAX), Some(start + Duration::from_secs(s))),
    };
    let seed = env_number("SKIFF_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let name_hash = target
        .bytes()
        .fold(seed, |h, b| h.rotate_left(5) ^ u64::from(b));
    let mut rng = fastrand::Rng::with_seed(name_hash);
    let mut done = 0;
    while done < cases && deadline.is_none_or(|d| Instant::now() < d) {
        let input = mutate(&mut rng, &corpus);
        check(target, *run, &input, &format!("mutated case {done}"));
        done += 1;
    }
    eprintln!(
        "{target}: {} corpus inputs and {done} mutated ones in {:.2?}",
        corpus.len(),
        start.elapsed()
    );
}

#[test]
fn spec_file() {
    run("spec_file");
}

#[test]
fn spec_conversions() {
    run("spec_conversions");
}

#[test]
fn image_reference() {
    run("image_reference");
}

#[test]
fn image_config() {
    run("image_config");
}

#[test]
fn tar_unpack() {
    run("tar_unpack");
}

#[test]
fn proxy_http_head() {
    run("proxy_http_head");
}

#[test]
fn wal_record() {
    run("wal_record");
}

#[test]
fn raft_message() {
    run("raft_message");
}

#[test]
fn every_target_has_a_test() {
    let source = include_str!("fuzz.rs");
    for (name, _) in skiff_fuzz::TARGETS {
        assert!(
            source.contains(&format!("fn {name}() {{\n    run(\"{name}\");")),
            "no test runs {name}"
        );
    }
}
