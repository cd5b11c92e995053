//! `matvec`: multiplies a large matrix kept in shared state by a vector,
//! the data-intensive case the local tier exists for. The matrix (2048 ×
//! 2048 `f32` = 16 MiB by default) is read in blocks of rows through the
//! node's local tier, so after the first call on a node no call moves it
//! again; `mul-fresh` fetches it from the global tier on every call
//! instead, as a stateless platform would.
//!
//! Input, one command:
//! - `init [ROWS COLS]`: build a deterministic matrix (default 2048 2048)
//!   and push it to the global tier under `matrix` (shape in `matrix.shape`);
//! - `mul SEED`: y = M·x for a vector x made from SEED; returns
//!   `rows=… sum=… y0=…`;
//! - `mul-fresh SEED`: the same after a `pull` of the whole matrix.

use shoal_sdk::state;

const MATRIX: &str = "matrix";
const SHAPE: &str = "matrix.shape";
/// Rows read per `get-range`.
const BLOCK_ROWS: usize = 64;

struct MatVec;

fn entry(i: usize, j: usize) -> f32 {
    ((i * 31 + j * 17) % 97) as f32 / 97.0
}

/// A vector of `n` values in [-1, 1) from a seed (xorshift).
fn vector(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn failed(what: &str) -> impl Fn(shoal_sdk::Error) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

fn init(rows: usize, cols: usize) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::with_capacity(rows * cols * 4);
    for i in 0..rows {
        for j in 0..cols {
            bytes.extend_from_slice(&entry(i, j).to_le_bytes());
        }
    }
    state::set(MATRIX, &bytes).map_err(failed("set matrix"))?;
    state::push(MATRIX).map_err(failed("push matrix"))?;
    state::set(SHAPE, format!("{rows} {cols}").as_bytes()).map_err(failed("set shape"))?;
    state::push(SHAPE).map_err(failed("push shape"))?;
    Ok(format!("matrix {rows}x{cols} ({} bytes) pushed", bytes.len()).into_bytes())
}

fn shape() -> Result<(usize, usize), String> {
    let text = state::get(SHAPE).map_err(failed("get shape"))?.ok_or("no matrix yet: call `init` first")?;
    let text = String::from_utf8(text).map_err(|_| "matrix.shape is not text")?;
    let mut dims = text.split(' ').map(|d| d.parse::<usize>().map_err(|_| format!("bad shape {text:?}")));
    Ok((dims.next().ok_or("empty shape")??, dims.next().ok_or("shape needs two numbers")??))
}

fn mul(seed: u64) -> Result<Vec<u8>, String> {
    let (rows, cols) = shape()?;
    let x = vector(seed, cols);
    let mut y = Vec::with_capacity(rows);
    let row_bytes = (cols * 4) as u64;
    for first in (0..rows).step_by(BLOCK_ROWS) {
        let n = BLOCK_ROWS.min(rows - first);
        let block =
            state::get_range(MATRIX, first as u64 * row_bytes, n as u64 * row_bytes).map_err(failed("read rows"))?;
        if block.len() as u64 != n as u64 * row_bytes {
            return Err(format!("matrix is shorter than its shape {rows}x{cols}"));
        }
        for row in block.chunks_exact(cols * 4) {
            let dot: f32 =
                row.chunks_exact(4).zip(&x).map(|(m, x)| f32::from_le_bytes([m[0], m[1], m[2], m[3]]) * x).sum();
            y.push(dot);
        }
    }
    let sum: f64 = y.iter().map(|v| f64::from(*v)).sum();
    Ok(format!("rows={rows} sum={sum:.4} y0={:.4}", y[0]).into_bytes())
}

impl shoal_sdk::Function for MatVec {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = String::from_utf8(input).map_err(|_| "input is not UTF-8".to_string())?;
        let words: Vec<&str> = text.split_whitespace().collect();
        let number = |i: usize, default: u64| -> Result<u64, String> {
            words.get(i).map_or(Ok(default), |w| w.parse().map_err(|_| format!("{w:?} is not a number")))
        };
        match words.first().copied() {
            Some("init") => init(number(1, 2048)? as usize, number(2, 2048)? as usize),
            Some("mul") => mul(number(1, 1)?),
            Some("mul-fresh") => {
                state::pull(MATRIX).map_err(failed("pull matrix"))?;
                mul(number(1, 1)?)
            }
            _ => Err("usage: init [ROWS COLS] | mul SEED | mul-fresh SEED".into()),
        }
    }
}

shoal_sdk::export!(MatVec);
