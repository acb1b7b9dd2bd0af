//! Taproom: a character-chat gateway that sits beside NextChat and in front of character
//! generation (a SillyTavern-style service or any OpenAI-compatible server).
//!
//! # Layout
//! Data flows one way: `http` (routing, middleware) → `auth` → handlers in `http::*` → domain
//! services (`characters`) → `store` (redb + moka).
//! - `cli`: `taproom serve` / `taproom token`.
//! - `config`: one typed `Config`, a pure function of (file, environment); passed down.
//! - `error`: `ApiError`, the spec's codes, statuses and envelope.
//! - `auth`: JWT verification (algorithm fixed by config) and minting.
//! - `http`: router, tower layers, extractors, handlers. The only module that knows wire shapes.
//! - `characters`: the character domain service (validation, access, versioning).
//! - `store`: the only module that knows redb; index tables and the character cache.
//! - `model`: the spec's Character and lorebook types.
//! - `plugins`: sandboxed wasm behaviour plugins (wasmtime host, WIT in `plugins/wit/`).
//! - `server`: builds the state and serves with graceful shutdown.

pub mod auth;
pub mod characters;
pub mod cli;
pub mod config;
pub mod error;
pub mod http;
pub mod model;
pub mod plugins;
pub mod server;
pub mod store;
pub mod time;
