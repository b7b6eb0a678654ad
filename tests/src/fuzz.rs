//! A seeded random fuzz harness (no nightly toolchain, no cargo-fuzz): each
//! target is a unit test in its own crate that hands [`run`] a body turning
//! a [`Rng`] into one input and feeding it to the code under test.
//!
//! The same bodies are libFuzzer targets (`fuzz/`, cargo-fuzz on nightly
//! with AddressSanitizer): there the [`Rng`] is [`Rng::from_bytes`] of
//! libFuzzer's input, so every choice a body makes is a few of its bytes,
//! and coverage guides libFuzzer's mutations to the choices that reach new
//! code (a structured input, as `arbitrary` gives, with no second
//! description of each target).
//!
//! - Inputs: `SKIFF_FUZZ_INPUTS` (resources/fuzz.sh sets a million), else
//!   the target's short default (what CI runs with every `cargo test`).
//! - Seed: `SKIFF_FUZZ_SEED`, else a fixed one. Input `i` depends only on
//!   the seed and `i`, so `SKIFF_FUZZ_ONLY=i` replays it alone.
//! - A panic is caught, counted and its input's index printed (the default
//!   hook prints the message); the target fails if any input panicked.
//! - An input that runs longer than [`HANG`] is a hang: the watchdog prints
//!   its index and aborts the process (a loop cannot be interrupted).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An input running longer than this is reported as a hang.
pub const HANG: Duration = Duration::from_secs(10);

/// Where a body's choices come from.
pub struct Rng(Source);

enum Source {
    /// xorshift64*: small, fast, reproducible.
    Xorshift(u64),
    /// libFuzzer's input, read front to back; zeros once it is used up.
    Bytes { data: Vec<u8>, at: usize },
}

impl Rng {
    /// The generator for input `index` under `seed` (splitmix64 of both,
    /// never zero).
    pub fn for_input(seed: u64, index: u64) -> Self {
        let mut z = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng(Source::Xorshift((z ^ (z >> 31)) | 1))
    }

    /// Choices read from `data` (a coverage-guided fuzzer's input).
    pub fn from_bytes(data: &[u8]) -> Self {
        Rng(Source::Bytes { data: data.to_vec(), at: 0 })
    }

    /// A generator of its own (for another thread): from bytes, the rest
    /// of the input (this one reads zeros after), else seeded from this.
    pub fn split(&mut self) -> Rng {
        match &mut self.0 {
            Source::Bytes { data, at } => {
                let rest = data.get(*at..).unwrap_or_default().to_vec();
                *at = data.len();
                Rng(Source::Bytes { data: rest, at: 0 })
            }
            Source::Xorshift(_) => Rng::for_input(self.next_u64(), 0),
        }
    }

    /// `n` bytes of the input as a little-endian number.
    fn take(&mut self, n: usize) -> Option<u64> {
        let Source::Bytes { data, at } = &mut self.0 else { return None };
        let mut v = 0u64;
        for i in 0..n {
            let b = data.get(*at).copied().unwrap_or(0);
            *at += 1;
            v |= u64::from(b) << (8 * i);
        }
        Some(v)
    }

    pub fn next_u64(&mut self) -> u64 {
        match &mut self.0 {
            Source::Xorshift(x) => {
                *x ^= *x >> 12;
                *x ^= *x << 25;
                *x ^= *x >> 27;
                x.wrapping_mul(0x2545_f491_4f6c_dd1d)
            }
            Source::Bytes { .. } => self.take(8).unwrap_or(0),
        }
    }

    /// Uniform in `0..n` (0 when n is 0). From bytes, only as many as `n`
    /// needs: a choice among 4 is one byte of the input.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let bytes = (64 - (n - 1).leading_zeros()).div_ceil(8).max(1) as usize;
        match self.take(bytes) {
            Some(v) => v % n,
            None => self.next_u64() % n,
        }
    }

    /// An index into a slice of `len` items.
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// Up to `max` random bytes, often few, sometimes all one value.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = match self.below(4) {
            0 => self.index(8.min(max + 1)),
            _ => self.index(max + 1),
        };
        if self.one_in(8) {
            let b = self.next_u64() as u8;
            return vec![b; len];
        }
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    /// A value biased to the edges that find bugs: 0, all ones, powers of
    /// two and their neighbours, small numbers.
    pub fn interesting(&mut self) -> u64 {
        match self.below(6) {
            0 => *self.pick(&[0, 1, 2, 0xff, 0xffff, 0xffff_ffff, u64::MAX, 1 << 63]),
            1 => 1u64 << self.below(64),
            2 => (1u64 << self.below(64)).wrapping_sub(1),
            3 => self.below(256),
            _ => self.next_u64(),
        }
    }
}

/// What a run saw.
#[derive(Debug)]
pub struct Report {
    pub inputs: u64,
    pub panics: Vec<u64>,
    pub slowest: Duration,
    pub seed: u64,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Runs `body` on `default_inputs` inputs (or what the environment says)
/// and fails the calling test on any panic.
pub fn run(target: &str, default_inputs: u64, mut body: impl FnMut(&mut Rng)) -> Report {
    let seed = env_u64("SKIFF_FUZZ_SEED").unwrap_or(0x5eed_5c1f_f000);
    let only = env_u64("SKIFF_FUZZ_ONLY");
    let inputs = env_u64("SKIFF_FUZZ_INPUTS").unwrap_or(default_inputs);
    let indices: Box<dyn Iterator<Item = u64>> = match only {
        Some(i) => Box::new(std::iter::once(i)),
        None => Box::new(0..inputs),
    };

    // The watchdog: the index being run and when it started (ms since t0).
    let t0 = Instant::now();
    let current = Arc::new((AtomicU64::new(u64::MAX), AtomicU64::new(0)));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (current, done, target) = (current.clone(), done.clone(), target.to_owned());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                let index = current.0.load(Ordering::Relaxed);
                let since = current.1.load(Ordering::Relaxed);
                let now = t0.elapsed().as_millis() as u64;
                if index != u64::MAX && now.saturating_sub(since) > HANG.as_millis() as u64 {
                    eprintln!(
                        "fuzz {target}: HANG: input {index} (seed {seed:#x}) runs for more than \
                         {HANG:?}; replay with SKIFF_FUZZ_SEED={seed:#x} SKIFF_FUZZ_ONLY={index}"
                    );
                    std::process::abort();
                }
            }
        })
    };

    let mut report = Report { inputs: 0, panics: Vec::new(), slowest: Duration::ZERO, seed };
    for i in indices {
        let mut rng = Rng::for_input(seed, i);
        current.1.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        current.0.store(i, Ordering::Relaxed);
        let start = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| body(&mut rng)));
        report.slowest = report.slowest.max(start.elapsed());
        current.0.store(u64::MAX, Ordering::Relaxed);
        report.inputs += 1;
        if outcome.is_err() {
            eprintln!("fuzz {target}: input {i} panicked (seed {seed:#x})");
            report.panics.push(i);
        }
    }
    let took = t0.elapsed();
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    // Shown with --nocapture (resources/fuzz.sh): the counts for the notes.
    println!(
        "fuzz {target}: {} inputs, {} panics, 0 hangs, slowest {:?}, {:?} in all, seed {seed:#x}",
        report.inputs,
        report.panics.len(),
        report.slowest,
        took
    );
    assert!(
        report.panics.is_empty(),
        "fuzz {target}: {} of {} inputs panicked, first {:?}; replay with \
         SKIFF_FUZZ_SEED={seed:#x} SKIFF_FUZZ_ONLY=<index>",
        report.panics.len(),
        report.inputs,
        &report.panics[..report.panics.len().min(10)]
    );
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::for_input(7, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::for_input(7, 3).next_u64(), Rng::for_input(7, 4).next_u64());
        assert_ne!(Rng::for_input(7, 3).next_u64(), Rng::for_input(8, 3).next_u64());
    }

    /// From bytes, each choice takes what it needs and the input's end
    /// reads as zeros.
    #[test]
    fn choices_from_bytes_read_the_input_in_order() {
        let mut r = Rng::from_bytes(&[3, 0x34, 0x12, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(r.below(4), 3, "one byte");
        assert_eq!(r.below(0x10000), 0x1234, "two bytes");
        assert_eq!(r.next_u64(), 0x0807_0605_0403_0201);
        assert_eq!(r.below(256), 9);
        assert_eq!((r.next_u64(), r.below(7)), (0, 0), "past the end");
    }

    #[test]
    fn a_panicking_input_fails_the_run() {
        let caught = catch_unwind(|| {
            run("self-test", 50, |rng| {
                assert!(rng.below(10) != 3, "found it");
            })
        });
        assert!(caught.is_err(), "the run must fail when an input panics");
    }

    #[test]
    fn a_clean_run_counts_its_inputs() {
        let mut seen = 0;
        let r = run("self-test-clean", 100, |rng| {
            seen += 1;
            let _ = rng.bytes(64);
        });
        assert_eq!((r.inputs, r.panics.len()), (seen, 0));
    }
}
