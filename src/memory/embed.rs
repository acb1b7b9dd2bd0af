//! Optional semantic recall: embeddings from an OpenAI-compatible `POST {url}/embeddings`
//! upstream (named by `memory.embeddings_upstream`) and cosine similarity. The request goes
//! through the upstream's pass-through call, so it shares its pool, retries and breaker.

use crate::upstream::Upstream;
use http_body_util::BodyExt;
use serde_json::{json, Value};

/// Largest embeddings response read, in bytes.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Embeds `inputs` (one vector per input, in order).
pub async fn embed(upstream: &Upstream, inputs: &[String]) -> Result<Vec<Vec<f32>>, String> {
    let body = json!({ "model": upstream.default_model(), "input": inputs }).to_string();
    let resp = upstream
        .passthrough("embeddings", body.into(), false)
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status.is_success() {
        return Err(format!("embeddings upstream answered {}", resp.status));
    }
    let bytes = http_body_util::Limited::new(resp.body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the embeddings response: {e}"))?
        .to_bytes();
    parse_embeddings(&bytes, inputs.len())
}

/// Parses an OpenAI `{"data": [{"index", "embedding": [...]}, ...]}` response.
pub fn parse_embeddings(bytes: &[u8], expected: usize) -> Result<Vec<Vec<f32>>, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or("no `data` array")?;
    let mut out: Vec<Option<Vec<f32>>> = vec![None; expected];
    for (pos, item) in data.iter().enumerate() {
        let index = item
            .get("index")
            .and_then(Value::as_u64)
            .map_or(pos, |i| i as usize);
        let vector: Vec<f32> = item
            .get("embedding")
            .and_then(Value::as_array)
            .ok_or("an item has no `embedding` array")?
            .iter()
            .map(|x| {
                x.as_f64()
                    .map(|f| f as f32)
                    .ok_or("a non-numeric embedding value")
            })
            .collect::<Result<_, _>>()?;
        if let Some(slot) = out.get_mut(index) {
            *slot = Some(vector);
        }
    }
    out.into_iter()
        .map(|v| v.ok_or_else(|| "an input got no embedding".to_string()))
        .collect()
}

/// Cosine similarity; 0 for empty, mismatched or zero vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_by_index() {
        let body =
            br#"{"data":[{"index":1,"embedding":[0.0,1.0]},{"index":0,"embedding":[1.0,0.0]}]}"#;
        assert_eq!(
            parse_embeddings(body, 2).unwrap(),
            vec![vec![1.0, 0.0], vec![0.0, 1.0]]
        );
        assert!(parse_embeddings(br#"{"data":[]}"#, 1).is_err());
        assert!(parse_embeddings(b"nope", 1).is_err());
    }

    #[test]
    fn cosine_cases() {
        let cases: [(&[f32], &[f32], f64); 4] = [
            (&[1.0, 0.0], &[1.0, 0.0], 1.0),
            (&[1.0, 0.0], &[0.0, 1.0], 0.0),
            (&[1.0, 0.0], &[-1.0, 0.0], -1.0),
            (&[1.0], &[1.0, 0.0], 0.0),
        ];
        for (a, b, want) in cases {
            assert!((cosine(a, b) - want).abs() < 1e-9, "{a:?} {b:?}");
        }
    }
}
