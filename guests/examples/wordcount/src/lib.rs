//! `wordcount`: word frequencies of a text as map-reduce over chained
//! calls. The text is split at whitespace into pieces of about 1 MiB; one
//! mapper per piece is spawned (this same function, in mapper mode), all
//! are awaited, and their counts are reduced into one JSON object of
//! word → count, sorted by word. (The pieces are 4 MiB: larger pieces mean
//! fewer mapper outputs for the one reducer to merge.)
//!
//! A word is a run of alphanumeric characters or apostrophes, lowercased.
//! Input starting with `\x01alone\n` counts the rest in this one call (the
//! baseline the map-reduce is measured against); `\x01map\n` is the mapper.

use std::collections::{BTreeMap, HashMap};

use shoal_sdk::invoke;

struct WordCount;

const PIECE: usize = 4 << 20;
const MAP: &[u8] = b"\x01map\n";
const ALONE: &[u8] = b"\x01alone\n";

fn add(counts: &mut HashMap<String, u64>, word: &str, n: u64) {
    match counts.get_mut(word) {
        Some(count) => *count += n,
        None => {
            counts.insert(word.to_string(), n);
        }
    }
}

fn count(text: &str, counts: &mut HashMap<String, u64>) {
    let mut lower = String::new();
    for word in text.split(|c: char| !(c.is_alphanumeric() || c == '\'')).filter(|w| !w.is_empty()) {
        if word.chars().any(char::is_uppercase) {
            lower.clear();
            lower.extend(word.chars().flat_map(char::to_lowercase));
            add(counts, &lower, 1);
        } else {
            add(counts, word, 1);
        }
    }
}

/// Split at whitespace into pieces of about `PIECE` bytes.
fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > PIECE {
        let cut = rest[PIECE..].find(char::is_whitespace).map_or(rest.len(), |i| PIECE + i);
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

fn to_json(counts: HashMap<String, u64>) -> Vec<u8> {
    let counts: BTreeMap<String, u64> = counts.into_iter().collect();
    // Words hold only alphanumerics and apostrophes: nothing to escape.
    let body: Vec<String> = counts.iter().map(|(word, n)| format!("\"{word}\":{n}")).collect();
    format!("{{{}}}", body.join(",")).into_bytes()
}

fn map_reduce(text: &str) -> Result<Vec<u8>, String> {
    let pieces = pieces(text);
    let mut ids = Vec::with_capacity(pieces.len());
    for piece in &pieces {
        let input = [MAP, piece.as_bytes()].concat();
        ids.push(invoke::spawn("wordcount", &input).map_err(|e| format!("spawning a mapper: {e:?}"))?);
    }
    let mut total: HashMap<String, u64> = HashMap::new();
    for id in ids {
        let mapped = invoke::await_(id).map_err(|e| format!("a mapper failed: {e:?}"))?;
        let mapped = String::from_utf8(mapped).map_err(|_| "a mapper returned non-UTF-8")?;
        for line in mapped.lines() {
            let (word, n) = line.rsplit_once(' ').ok_or("a mapper returned a bad line")?;
            add(&mut total, word, n.parse::<u64>().map_err(|_| "a bad count")?);
        }
    }
    Ok(to_json(total))
}

impl shoal_sdk::Function for WordCount {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        if let Some(piece) = input.strip_prefix(MAP) {
            let mut counts = HashMap::new();
            count(&String::from_utf8_lossy(piece), &mut counts);
            let lines: Vec<String> = counts.into_iter().map(|(word, n)| format!("{word} {n}")).collect();
            return Ok(lines.join("\n").into_bytes());
        }
        if let Some(text) = input.strip_prefix(ALONE) {
            let mut counts = HashMap::new();
            count(&String::from_utf8_lossy(text), &mut counts);
            return Ok(to_json(counts));
        }
        let text = String::from_utf8(input).map_err(|_| "input is not UTF-8".to_string())?;
        map_reduce(&text)
    }
}

shoal_sdk::export!(WordCount);
