//! Primes below 2^26: whether `n` is prime, and how many primes there are
//! up to `n`. The tables behind the answers (a sieve of 8 MiB and a table
//! of counts of 512 KiB) are built by `init`.
//!
//! Deployed with `snapshot=true`, `init` runs once, at deploy, and every
//! call starts with the tables built. Deployed without, each call builds
//! them first (a fresh instance every call): the cost a snapshot removes.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// Numbers covered: 0 .. 2^26.
const LIMIT: usize = 1 << 26;

struct Tables {
    /// Bit `n` is set when `n` is prime.
    prime: Vec<u64>,
    /// Primes below `64 * i`, for each word `i`.
    below: Vec<u32>,
}

static TABLES: OnceLock<Tables> = OnceLock::new();
/// Set by `init` only: the answer says where its tables came from.
static BUILT_BY_INIT: AtomicBool = AtomicBool::new(false);

fn build() -> Tables {
    let words = LIMIT / 64;
    let mut prime = vec![u64::MAX; words];
    prime[0] &= !0b11; // 0 and 1
    let mut p = 2;
    while p * p < LIMIT {
        if prime[p / 64] >> (p % 64) & 1 == 1 {
            let mut multiple = p * p;
            while multiple < LIMIT {
                prime[multiple / 64] &= !(1 << (multiple % 64));
                multiple += p;
            }
        }
        p += 1;
    }
    let mut below = Vec::with_capacity(words);
    let mut count = 0u32;
    for word in &prime {
        below.push(count);
        count += word.count_ones();
    }
    Tables { prime, below }
}

struct Primes;

impl shoal_sdk::Function for Primes {
    fn init() {
        TABLES.get_or_init(build);
        BUILT_BY_INIT.store(true, Ordering::Relaxed);
    }

    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = String::from_utf8_lossy(&input);
        let n: usize = text.trim().parse().map_err(|_| format!("input {:?} is not a whole number", text.trim()))?;
        if n >= LIMIT {
            return Err(format!("{n} is past the table (numbers below {LIMIT})"));
        }
        let tables = TABLES.get_or_init(build);
        let (word, bit) = (n / 64, n % 64);
        let is_prime = tables.prime[word] >> bit & 1 == 1;
        let up_to = tables.below[word] + (tables.prime[word] & (u64::MAX >> (63 - bit))).count_ones();
        let verdict = if is_prime { "prime" } else { "not prime" };
        let source = if BUILT_BY_INIT.load(Ordering::Relaxed) { "init" } else { "this call" };
        Ok(format!("{n} is {verdict}; {up_to} primes up to {n} (tables built by {source})").into_bytes())
    }
}

shoal_sdk::export!(Primes, init);
