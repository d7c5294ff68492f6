//! Teacher-forced log-probabilities of the engine, for accuracy studies
//! (`bench/accuracy_vs_exact.py`): every sequence runs through the model in one pass and the
//! log-softmax of every position that predicts a scored token is written out.
//!
//! ```text
//! cargo run --release -p tpserve-model --example teacher_forced -- MODEL.gguf IN.jsonl OUT.f32
//! ```
//!
//! `IN.jsonl` holds one `{"ids": [...], "from": k}` per line: the whole sequence (BOS first)
//! and the index of the first token to score. For each line, in order, `OUT.f32` receives
//! `len(ids) - k` rows of `vocab` little-endian f32: row `i` is the log-softmax of the logits
//! at position `k - 1 + i`, i.e. the distribution that predicts `ids[k + i]`.
//! `TPSERVE_THREADS` sets the thread count (default: all cores).

use std::io::{BufRead, BufWriter, Write};

use tpserve_gguf::Gguf;
use tpserve_model::model::{LogitsWanted, Model};
use tpserve_model::testing::Seqs;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_path, input, output] = args.as_slice() else {
        return Err("usage: teacher_forced MODEL.gguf IN.jsonl OUT.f32".into());
    };
    let threads = std::env::var("TPSERVE_THREADS").ok().map(|t| t.parse()).transpose()?.unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let g = Gguf::open(model_path)?;
    let model = Model::load(&g)?;
    let vocab = model.config().vocab;
    let mut out = BufWriter::new(std::fs::File::create(output)?);
    for (n, line) in std::io::BufReader::new(std::fs::File::open(input)?).lines().enumerate() {
        let line = line?;
        let case: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("{input}:{}: {e}", n + 1))?;
        let ids: Vec<u32> = case["ids"].as_array().ok_or("no ids")?.iter().map(|v| v.as_u64().map(|x| x as u32)).collect::<Option<_>>().ok_or("bad id")?;
        let from = case["from"].as_u64().ok_or("no from")? as usize;
        if from == 0 || from > ids.len() {
            return Err(format!("{input}:{}: from {from} outside 1..={}", n + 1, ids.len()).into());
        }
        let logits = pool.install(|| {
            let mut seqs = Seqs::new(&model, 1, ids.len());
            seqs.forward(&model, &[(0, &ids[..ids.len() - 1], LogitsWanted::All)])
        })?;
        for row in logits[0].chunks_exact(vocab).skip(from - 1) {
            let lse = tpserve_types::sampling::logsumexp(row.iter().copied());
            for &l in row {
                out.write_all(&(l - lse).to_le_bytes())?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
