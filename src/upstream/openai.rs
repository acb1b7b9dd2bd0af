//! OpenAI-compatible wire protocol: the `/chat/completions` request body, the JSON response and
//! the SSE stream (`data: {...}` lines ending with `data: [DONE]`).

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::error::{UpstreamError, UpstreamErrorKind};
use super::{ChatMessage, GenerateRequest, GenerateResult, StreamEvent, TokenUsage};

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// Serializes the `/chat/completions` body.
pub(crate) fn request_body(
    req: &GenerateRequest,
    default_model: &str,
    stream: bool,
) -> Result<Bytes, UpstreamError> {
    let p = &req.params;
    let body = Body {
        model: p.model.as_deref().unwrap_or(default_model),
        messages: &req.messages,
        stream,
        // Ask for usage in the final chunk; servers that do not know the option ignore it.
        stream_options: stream.then_some(StreamOptions {
            include_usage: true,
        }),
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        max_tokens: p.max_tokens,
        stop: &p.stop,
    };
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| UpstreamError::new(UpstreamErrorKind::Rejected, "", e.to_string()))
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
}

impl From<Usage> for TokenUsage {
    fn from(u: Usage) -> Self {
        TokenUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: if u.total_tokens > 0 {
                u.total_tokens
            } else {
                u.prompt_tokens + u.completion_tokens
            },
        }
    }
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    model: String,
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Option<Message>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<String>,
}

/// Parses a non-streaming completion.
pub(crate) fn parse_response(
    upstream: &str,
    bytes: &[u8],
) -> Result<GenerateResult, UpstreamError> {
    let c: Completion =
        serde_json::from_slice(bytes).map_err(|e| UpstreamError::malformed(upstream, e))?;
    let choice = c
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| UpstreamError::malformed(upstream, "no choices"))?;
    Ok(GenerateResult {
        content: choice.message.and_then(|m| m.content).unwrap_or_default(),
        model: c.model,
        usage: c.usage.map(TokenUsage::from).unwrap_or_default(),
        finish_reason: choice.finish_reason.unwrap_or_else(|| "stop".to_owned()),
        generation_time_ms: 0,
        character_state: None,
    })
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
}

/// Assembles the final result from SSE lines; separate from the body so it is testable alone.
#[derive(Default)]
pub(crate) struct SseState {
    upstream: String,
    result: GenerateResult,
    saw_done: bool,
}

/// Reads SSE frames from a streaming completion and assembles the final result as it goes.
pub(crate) struct SseReader {
    body: super::UpstreamBody,
    buf: BytesMut,
    state: SseState,
    started: Instant,
}

impl SseReader {
    pub(crate) fn new(upstream: &str, body: super::UpstreamBody, started: Instant) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            state: SseState {
                upstream: upstream.to_owned(),
                ..SseState::default()
            },
            started,
        }
    }

    fn broken(&self, msg: impl Into<String>) -> UpstreamError {
        UpstreamError::new(UpstreamErrorKind::StreamBroken, &self.state.upstream, msg)
    }

    /// The next delta, or `Done` once the body ends after `[DONE]` or a finish reason.
    pub(crate) async fn next_event(&mut self) -> Result<StreamEvent, UpstreamError> {
        loop {
            while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                if let Some(delta) = self.state.line(&line)? {
                    return Ok(StreamEvent::Delta(delta));
                }
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buf.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
                Some(Err(e)) => {
                    return Err(self.broken(format!(
                        "stream broke: {}",
                        super::transport::error_chain(&e)
                    )))
                }
                None => {
                    // A last line without a trailing newline still counts.
                    if !self.buf.is_empty() {
                        let line = self.buf.split();
                        if let Some(delta) = self.state.line(&line)? {
                            return Ok(StreamEvent::Delta(delta));
                        }
                    }
                    if self.state.saw_done || !self.state.result.finish_reason.is_empty() {
                        let mut result = std::mem::take(&mut self.state.result);
                        if result.finish_reason.is_empty() {
                            result.finish_reason = "stop".to_owned();
                        }
                        result.generation_time_ms = self.started.elapsed().as_millis() as u64;
                        return Ok(StreamEvent::Done(result));
                    }
                    return Err(self.broken("stream ended before it finished"));
                }
            }
        }
    }
}

impl SseState {
    /// Handles one SSE line; returns a non-empty delta to emit.
    fn line(&mut self, line: &[u8]) -> Result<Option<String>, UpstreamError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            // Blank separators, `event:`, `id:` and `:` comments carry nothing we need.
            return Ok(None);
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            self.saw_done = true;
            return Ok(None);
        }
        let chunk: Chunk = serde_json::from_slice(data).map_err(|e| {
            UpstreamError::new(
                UpstreamErrorKind::Malformed,
                &self.upstream,
                format!("upstream sent an unparseable stream chunk: {e}"),
            )
        })?;
        if let Some(m) = chunk.model {
            if self.result.model.is_empty() {
                self.result.model = m;
            }
        }
        if let Some(u) = chunk.usage {
            self.result.usage = u.into();
        }
        let mut out = None;
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(r) = choice.finish_reason {
                self.result.finish_reason = r;
            }
            if let Some(text) = choice.delta.and_then(|d| d.content) {
                if !text.is_empty() {
                    self.result.content.push_str(&text);
                    out = Some(text);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_assemble_the_result() {
        let lines: &[&[u8]] = &[
            b": keep-alive comment\n",
            b"event: message\r\n",
            b"data: {\"model\":\"m1\",\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\r\n",
            b"\r\n",
            b"data:{\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n",
            b"data: {\"choices\":[{\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"length\"}]}\n",
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n",
            b"data: [DONE]\n",
        ];
        let mut st = SseState::default();
        let mut deltas = Vec::new();
        for l in lines {
            match st.line(l) {
                Ok(Some(d)) => deltas.push(d),
                Ok(None) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(deltas, ["Hel", "lo"]);
        assert!(st.saw_done);
        assert_eq!(st.result.content, "Hello");
        assert_eq!(st.result.model, "m1");
        assert_eq!(st.result.finish_reason, "length");
        assert_eq!(st.result.usage.total_tokens, 5);
        assert!(st.line(b"data: {nope\n").is_err());
    }

    #[test]
    fn completion_body_parses_and_rejects_garbage() {
        let ok = br#"{"model":"m","choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        let r = parse_response("u", ok).unwrap_or_default();
        assert_eq!((r.content.as_str(), r.usage.total_tokens), ("hi", 2));
        for bad in [&b"<html>"[..], b"{}", br#"{"choices":[]}"#] {
            let e = parse_response("u", bad).err();
            assert_eq!(e.map(|e| e.spec_code()), Some("ST_GENERATION_FAILED"));
        }
    }
}
