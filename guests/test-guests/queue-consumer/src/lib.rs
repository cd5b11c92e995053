//! A queue's consumer for the host's tests: for a batch
//! (`{"queue", "messages": [{"id", "body", "attempt", …}]}`) it asks to
//! retry every message whose body starts with `poison`, and one in ten of
//! the others at random (but never one that starts with `keep:`, for
//! benchmarks); the rest it handles by writing their ids, one
//! per line, to the state key `seen/<first id of the batch>/<attempt>`
//! (pushed to the global tier), so a test can count how often each
//! message was handled. A body of `fail` fails the whole batch.

use std::hash::BuildHasher;

use shoal_sdk::state;

struct QueueConsumer;

impl shoal_sdk::Function for QueueConsumer {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let batch: serde_json::Value = serde_json::from_slice(&input).map_err(|e| e.to_string())?;
        let messages = batch["messages"].as_array().ok_or("no messages")?;
        // Keys from WASI's random source: a fresh draw per call.
        let random = std::collections::hash_map::RandomState::new();
        let (mut retry, mut handled) = (Vec::new(), Vec::new());
        for message in messages {
            let id = message["id"].as_str().ok_or("a message without an id")?;
            let body = message["body"].as_str().unwrap_or_default();
            if body == "fail" {
                return Err("asked to fail the batch".into());
            }
            if body.starts_with("poison") || (!body.starts_with("keep:") && random.hash_one(id) % 10 == 0) {
                retry.push(id.to_string());
            } else {
                handled.push(id.to_string());
            }
        }
        if let Some(first) = handled.first() {
            let attempt = messages[0]["attempt"].as_u64().unwrap_or(0);
            let key = format!("seen/{first}/{attempt}");
            let mut lines = handled.join("\n");
            lines.push('\n');
            state::set(&key, lines.as_bytes()).map_err(|e| format!("{e:?}"))?;
            state::push(&key).map_err(|e| format!("{e:?}"))?;
        }
        Ok(serde_json::json!({ "retry": retry }).to_string().into_bytes())
    }
}

shoal_sdk::export!(QueueConsumer);
