//! Taproom: a character-chat gateway that sits beside NextChat and in front of character
//! generation (a SillyTavern-style service or any OpenAI-compatible server).
//!
//! # Layout
//! Data flows one way: `http` (routing, middleware) → `auth` → handlers in `http::*` → domain
//! services (`characters`, `conversations`, `interact`) → `store` (redb + moka), `upstream`,
//! `prompt`.
//! - `cli`: `taproom serve`, `token`, `check-config`, `backup`, `restore`, `export-all`,
//!   `import`.
//! - `config`: one typed `Config`, a pure function of (file, environment); passed down.
//! - `error`: `ApiError`, the spec's codes, statuses and envelope.
//! - `auth`: JWT verification (algorithm fixed by config) and minting.
//! - `http`: router, tower layers, extractors, handlers. The only module that knows wire shapes.
//! - `characters`: the character domain service (validation, access, versioning).
//! - `conversations`: conversations, swipes, SillyTavern chat JSONL.
//! - `interact`: one chat turn: prepare → generate (whole or streamed) → store.
//! - `memory`: long-term memory: the memory API, BM25 recall into the prompt, rolling summaries.
//! - `prompt`: SillyTavern-compatible prompt building: tokens, macros, lorebook, assembly. Pure.
//! - `store`: the only module that knows redb; index tables and caches.
//! - `model`: the spec's Character, lorebook, conversation and message types.
//! - `server`: builds the state and runs the accept loop (plain or TLS, plus the optional
//!   https redirect listener) with graceful shutdown.
//! - `tls`: rustls server config from PEM files, reloaded on file change or SIGHUP.
//! - `ops`: the operations commands (check-config, backup, restore, export, import).
//! - `transfer`: one user's characters and chats as files (export-all / import).
//! - `metrics`: the Prometheus registry, the request metrics middleware and shared handles.
//! - `upstream`: clients for SillyTavern and OpenAI-compatible upstreams, with retries and a
//!   circuit breaker. The only module that knows the upstream protocols.
//! - `cards`: SillyTavern card import/export (PNG tEXt chunks, JSON V1/V2/V3, CharX, lorebooks). Pure.
//! - `plugins`: per-character behaviour plugins as sandboxed wasmtime components. The only module that knows wasmtime.

/// mimalloc for every binary that links Taproom (the server, its tests and benchmarks alike):
/// requests allocate on one worker thread and free on another, which glibc's arenas serialise.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod auth;
pub mod cards;
pub mod characters;
pub mod cli;
pub mod config;
pub mod conversations;
pub mod error;
pub mod http;
pub mod interact;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod plugins;
pub mod prompt;
pub mod server;
pub mod store;
pub mod time;
pub mod tls;
pub mod transfer;
pub mod upstream;
