//! Taproom: a character-chat gateway that sits beside NextChat and in front of character
//! generation (a SillyTavern-style service or any OpenAI-compatible server).
//!
//! # Layout
//! Data flows one way: `http` (routing, middleware) → `auth` → handlers in `http::*` → domain
//! services (`characters`, `conversations`, `interact`) → `store` (redb + moka), `upstream`,
//! `prompt`.
//! - `cli`: `taproom serve` / `taproom token`.
//! - `config`: one typed `Config`, a pure function of (file, environment); passed down.
//! - `error`: `ApiError`, the spec's codes, statuses and envelope.
//! - `auth`: JWT verification (algorithm fixed by config) and minting.
//! - `http`: router, tower layers, extractors, handlers. The only module that knows wire shapes.
//! - `characters`: the character domain service (validation, access, versioning).
//! - `conversations`: conversations, swipes, SillyTavern chat JSONL.
//! - `memory`: long-term memory: the memory API, BM25 recall into the prompt, rolling summaries.
//! - `prompt`: SillyTavern-compatible prompt building: tokens, macros, lorebook, assembly. Pure.
//! - `store`: the only module that knows redb; index tables and caches.
//! - `model`: the spec's Character, lorebook, conversation and message types.
//! - `server`: builds the state and serves with graceful shutdown.
//! - `upstream`: clients for SillyTavern and OpenAI-compatible upstreams, with retries and a
//!   circuit breaker. The only module that knows the upstream protocols.

pub mod auth;
pub mod characters;
pub mod cli;
pub mod config;
pub mod conversations;
pub mod error;
pub mod http;
pub mod memory;
pub mod model;
pub mod prompt;
pub mod server;
pub mod store;
pub mod time;
pub mod upstream;
