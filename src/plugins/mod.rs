//! Per-character behaviour plugins: sandboxed WebAssembly components called before and after
//! generation (WIT world `taproom:plugin@0.1.0` in `plugins/wit/`).
//!
//! # Layout
//! - `config`: the `[plugins]` section.
//! - `manifest`: `plugin.toml` (name, version, hooks, failure policy, limits, config schema).
//! - `schema`: the JSON Schema subset used to validate a character's plugin config.
//! - `types`: the host API's contexts, outcomes and failures (plain data).
//! - `runtime`: everything wasmtime: engine, pooling allocator, epoch ticker, linker, per-call
//!   `Store`, host imports. Architecture invariant: no other module names wasmtime.
//! - `stats`: counters, percentiles and the failure breaker.
//!
//! # Lifecycle of a call
//! 1. look the binding's plugin up in the current set (an `Arc` snapshot, so a reload never
//!    disturbs a call in flight); a hook the manifest does not declare is a no-op;
//! 2. refuse while the breaker is open (`Disabled`);
//! 3. take an instance permit (bounds concurrency to the pool's size), then on a blocking
//!    thread: fresh `Store` with memory limiter and epoch deadline → instantiate from the
//!    `InstancePre` → call → drop the store (a trapped instance is never reused);
//! 4. validate the output (sizes, roles, state JSON), record stats and breaker state.

mod config;
mod manifest;
mod runtime;
mod schema;
mod stats;
mod types;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use config::PluginsConfig;
pub use manifest::{FailurePolicy, Hook, Manifest, ManifestLimits};
pub use stats::{percentile, PluginStats};
pub use types::{
    AfterContext, AfterOutcome, BeforeContext, BeforeOutcome, Binding, CallContext, FailureKind,
    HistoryMessage, LogLevel, MemoryEntry, PluginCharacter, PluginError, PluginFailure, PluginLog,
    PromptMessage, PromptSection, RecallFn, ReplyAction, SectionPosition,
};

use runtime::{CallLimits, Compiled, Prepared, Runtime};
use stats::{Breaker, Counters};

/// Largest plugin config a binding may carry, in bytes of JSON (it is copied into every call).
const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// Longest veto reason kept, in bytes.
const MAX_VETO_REASON: usize = 1024;

/// One loaded plugin of the current set.
struct LoadedPlugin {
    manifest: Manifest,
    name: Arc<str>,
    prepared: Prepared,
    limits: CallLimits,
    max_output: usize,
    max_state: usize,
    breaker: Breaker,
    breaker_threshold: u32,
    cooldown: Duration,
    counters: Arc<Counters>,
}

/// An immutable set of plugins; reload builds a new one and swaps the `Arc`.
struct PluginSet {
    plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    /// What the dir looked like when this set was loaded (for the watcher).
    fingerprint: Fingerprint,
}

/// Paths, sizes and mtimes of every file in the plugin folders.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// The plugin host: loads plugins from the plugins dir and runs their hooks.
pub struct PluginHost {
    cfg: PluginsConfig,
    runtime: Runtime,
    /// Current set. A lock around an `Arc` so calls take a cheap snapshot and reload swaps it
    /// atomically; in-flight calls finish on the set they started with.
    set: RwLock<Arc<PluginSet>>,
    /// Counters by plugin name; kept outside the set so they survive reloads.
    counters: Mutex<HashMap<String, Arc<Counters>>>,
    /// Compiled components by content hash, so a reload recompiles only changed files.
    compiled: Mutex<HashMap<u64, Compiled>>,
    /// One permit per pooled instance slot: calls wait here instead of failing when the pool
    /// is full.
    permits: Arc<Semaphore>,
    /// Serializes reloads (the watcher and an admin request may race).
    reload_lock: Mutex<()>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("dir", &self.cfg.dir)
            .field("plugins", &self.names())
            .finish_non_exhaustive()
    }
}

impl PluginHost {
    /// Loads and compiles every plugin in `cfg.dir`. A missing or empty dir means no plugins.
    pub fn load(cfg: &PluginsConfig) -> Result<Arc<Self>, PluginError> {
        cfg.validate().map_err(PluginError::Config)?;
        let memory_bytes = u64::from(cfg.memory_mib) * 1024 * 1024;
        let runtime = Runtime::new(cfg.max_concurrent_instances, memory_bytes)
            .map_err(PluginError::Engine)?;
        let host = Self {
            cfg: cfg.clone(),
            runtime,
            set: RwLock::new(Arc::new(PluginSet {
                plugins: BTreeMap::new(),
                fingerprint: Vec::new(),
            })),
            counters: Mutex::new(HashMap::new()),
            compiled: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(cfg.max_concurrent_instances as usize)),
            reload_lock: Mutex::new(()),
        };
        host.reload()?;
        Ok(Arc::new(host))
    }

    /// The host-wide config.
    pub fn config(&self) -> &PluginsConfig {
        &self.cfg
    }

    fn current(&self) -> Arc<PluginSet> {
        match self.set.read() {
            Ok(set) => set.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Names of the loaded plugins, sorted.
    pub fn names(&self) -> Vec<String> {
        self.current().plugins.keys().cloned().collect()
    }

    /// The manifest of a loaded plugin.
    pub fn manifest(&self, name: &str) -> Option<Manifest> {
        self.current().plugins.get(name).map(|p| p.manifest.clone())
    }

    /// The interfaces a loaded plugin's component imports: `taproom:plugin/host` plus any
    /// `wasi:*` interfaces its standard library pulled in (all of which trap when called).
    pub fn imports(&self, name: &str) -> Option<Vec<String>> {
        self.current()
            .plugins
            .get(name)
            .map(|p| p.prepared.imports.clone())
    }

    /// Checks that `name` is loaded and `config` satisfies its manifest's schema. Meant for the
    /// endpoint that attaches a plugin to a character; the message says what to fix.
    pub fn validate_binding(&self, name: &str, config: &serde_json::Value) -> Result<(), String> {
        let set = self.current();
        let plugin = set
            .plugins
            .get(name)
            .ok_or_else(|| format!("no plugin named {name} is loaded"))?;
        let config = normalize_config(config);
        let encoded = config.to_string();
        if encoded.len() > MAX_CONFIG_BYTES {
            return Err(format!(
                "plugin config is {} bytes; keep it under {MAX_CONFIG_BYTES}",
                encoded.len()
            ));
        }
        match &plugin.manifest.config_schema {
            Some(schema) => schema::validate(schema, &config)
                .map_err(|e| format!("invalid config for plugin {name}: {e}")),
            None => Ok(()),
        }
    }

    /// Admin stats of every loaded plugin.
    pub fn stats(&self) -> Vec<PluginStats> {
        let now = Instant::now();
        self.current()
            .plugins
            .values()
            .map(|p| {
                let (calls, failures, traps, timeouts, p50_us, p99_us) = p.counters.snapshot();
                let disabled_until = p.breaker.blocked(now).map(|left| {
                    let at = SystemTime::now() + left;
                    at.duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                });
                PluginStats {
                    name: p.manifest.name.clone(),
                    version: p.manifest.version.clone(),
                    hooks: p.manifest.hooks.clone(),
                    calls,
                    failures,
                    traps,
                    timeouts,
                    p50_us,
                    p99_us,
                    disabled_until,
                }
            })
            .collect()
    }

    /// Re-reads the plugins dir and swaps in the new set atomically. On error the current set
    /// stays in place. Compiles changed components, so call it off the async threads.
    pub fn reload(&self) -> Result<(), PluginError> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let fingerprint = fingerprint(&self.cfg.dir);
        let folders = plugin_folders(&self.cfg.dir)?;
        let mut plugins = BTreeMap::new();
        let mut used_hashes = Vec::new();
        for folder in folders {
            let manifest = Manifest::read(&folder).map_err(PluginError::Manifest)?;
            let name = manifest.name.clone();
            if plugins.contains_key(&name) {
                return Err(PluginError::Duplicate(name));
            }
            let component_path = folder.join(&manifest.component);
            let bytes = std::fs::read(&component_path).map_err(|e| PluginError::Component {
                name: name.clone(),
                message: format!("cannot read {}: {e}", component_path.display()),
            })?;
            let hash = content_hash(&bytes);
            used_hashes.push(hash);
            let component =
                self.compile_cached(hash, &bytes)
                    .map_err(|message| PluginError::Component {
                        name: name.clone(),
                        message,
                    })?;
            let prepared =
                self.runtime
                    .prepare(&component)
                    .map_err(|message| PluginError::Component {
                        name: name.clone(),
                        message,
                    })?;
            let loaded = self.loaded(manifest, prepared);
            tracing::info!(plugin = %name, version = %loaded.manifest.version, "plugin loaded");
            plugins.insert(name, Arc::new(loaded));
        }
        if let Ok(mut cache) = self.compiled.lock() {
            cache.retain(|h, _| used_hashes.contains(h));
        }
        let new = Arc::new(PluginSet {
            plugins,
            fingerprint,
        });
        match self.set.write() {
            Ok(mut set) => *set = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
        Ok(())
    }

    fn compile_cached(&self, hash: u64, bytes: &[u8]) -> Result<Compiled, String> {
        if let Some(c) = self
            .compiled
            .lock()
            .ok()
            .and_then(|c| c.get(&hash).cloned())
        {
            return Ok(c);
        }
        let component = self.runtime.compile(bytes)?;
        if let Ok(mut cache) = self.compiled.lock() {
            cache.insert(hash, component.clone());
        }
        Ok(component)
    }

    fn loaded(&self, manifest: Manifest, prepared: Prepared) -> LoadedPlugin {
        let cfg = &self.cfg;
        let l = &manifest.limits;
        let timeout_ms = l
            .timeout_ms
            .map_or(cfg.timeout_ms, |t| t.clamp(1, cfg.timeout_ms));
        let memory_mib = l
            .memory_mib
            .map_or(cfg.memory_mib, |m| m.clamp(1, cfg.memory_mib));
        let counters = self
            .counters
            .lock()
            .map(|mut c| c.entry(manifest.name.clone()).or_default().clone())
            .unwrap_or_default();
        LoadedPlugin {
            name: Arc::from(manifest.name.as_str()),
            limits: CallLimits {
                timeout: Duration::from_millis(timeout_ms),
                memory_bytes: memory_mib as usize * 1024 * 1024,
            },
            max_output: l
                .max_output_bytes
                .map_or(cfg.max_output_bytes, |m| m.min(cfg.max_output_bytes)),
            max_state: l
                .max_state_bytes
                .map_or(cfg.max_state_bytes, |m| m.min(cfg.max_state_bytes)),
            breaker: Breaker::default(),
            breaker_threshold: cfg.failure_threshold,
            cooldown: Duration::from_millis(cfg.cooldown_ms),
            counters,
            prepared,
            manifest,
        }
    }

    /// The plugin a binding names, or `None` when it does not declare `hook`.
    fn lookup(
        &self,
        binding: &Binding,
        hook: Hook,
    ) -> Result<Option<Arc<LoadedPlugin>>, PluginFailure> {
        let set = self.current();
        let plugin = set
            .plugins
            .get(&binding.name)
            .ok_or_else(|| PluginFailure {
                plugin: binding.name.clone(),
                hook: hook.as_str().into(),
                kind: FailureKind::NotFound,
                // An unknown plugin cannot declare a policy; failing open keeps a character usable
                // when its plugin was removed from the dir.
                policy: FailurePolicy::FailOpen,
                message: format!("no plugin named {} is loaded", binding.name),
            })?;
        Ok(plugin.manifest.has_hook(hook).then(|| plugin.clone()))
    }

    /// Runs the binding's before-generate hook (no-op outcome if the plugin does not declare it).
    pub async fn before_generate(
        self: &Arc<Self>,
        binding: &Binding,
        ctx: &BeforeContext,
    ) -> Result<BeforeOutcome, PluginFailure> {
        let Some(plugin) = self.lookup(binding, Hook::BeforeGenerate)? else {
            return Ok(BeforeOutcome::default());
        };
        let permit = self.permit(&plugin, Hook::BeforeGenerate).await?;
        let config = normalize_config(&binding.config).to_string();
        let ctx = ctx.clone();
        let join = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            run_before(&plugin, &ctx, &config)
        });
        join.await
            .unwrap_or_else(|e| Err(failure_of_join(&binding.name, Hook::BeforeGenerate, &e)))
    }

    /// Runs the binding's after-generate hook on the complete reply.
    pub async fn after_generate(
        self: &Arc<Self>,
        binding: &Binding,
        ctx: &AfterContext,
        reply: &str,
    ) -> Result<AfterOutcome, PluginFailure> {
        let Some(plugin) = self.lookup(binding, Hook::AfterGenerate)? else {
            return Ok(AfterOutcome::default());
        };
        let permit = self.permit(&plugin, Hook::AfterGenerate).await?;
        let config = normalize_config(&binding.config).to_string();
        let ctx = ctx.clone();
        let reply = reply.to_string();
        let join = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            run_after(&plugin, &ctx, &config, &reply)
        });
        join.await
            .unwrap_or_else(|e| Err(failure_of_join(&binding.name, Hook::AfterGenerate, &e)))
    }

    /// Synchronous before-generate on the calling thread, without an instance permit: for
    /// benchmarks and blocking callers that bound their own concurrency.
    pub fn before_generate_blocking(
        &self,
        binding: &Binding,
        ctx: &BeforeContext,
    ) -> Result<BeforeOutcome, PluginFailure> {
        match self.lookup(binding, Hook::BeforeGenerate)? {
            Some(plugin) => {
                run_before(&plugin, ctx, &normalize_config(&binding.config).to_string())
            }
            None => Ok(BeforeOutcome::default()),
        }
    }

    /// Synchronous after-generate on the calling thread, without an instance permit.
    pub fn after_generate_blocking(
        &self,
        binding: &Binding,
        ctx: &AfterContext,
        reply: &str,
    ) -> Result<AfterOutcome, PluginFailure> {
        match self.lookup(binding, Hook::AfterGenerate)? {
            Some(plugin) => run_after(
                &plugin,
                ctx,
                &normalize_config(&binding.config).to_string(),
                reply,
            ),
            None => Ok(AfterOutcome::default()),
        }
    }

    async fn permit(
        &self,
        plugin: &LoadedPlugin,
        hook: Hook,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, PluginFailure> {
        self.permits.clone().acquire_owned().await.map_err(|_| {
            failure(
                plugin,
                hook,
                FailureKind::Unavailable,
                "the plugin host is shut down".into(),
            )
        })
    }
}

/// Starts a task that polls the plugins dir every `watch_interval_ms` and reloads when a file
/// changed. Returns `None` when `watch = false`. The task ends when the host is dropped.
pub fn spawn_watcher(host: &Arc<PluginHost>) -> Option<tokio::task::JoinHandle<()>> {
    if !host.cfg.watch {
        return None;
    }
    let weak: Weak<PluginHost> = Arc::downgrade(host);
    let every = Duration::from_millis(host.cfg.watch_interval_ms.max(100));
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A failed reload is retried only when the files change again, not every tick.
        let mut last_failed: Option<Fingerprint> = None;
        loop {
            ticker.tick().await;
            let Some(host) = weak.upgrade() else { return };
            let dir = host.cfg.dir.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&dir)).await else {
                continue;
            };
            if now == host.current().fingerprint || last_failed.as_ref() == Some(&now) {
                continue;
            }
            let reloading = host.clone();
            match tokio::task::spawn_blocking(move || reloading.reload()).await {
                Ok(Ok(())) => {
                    last_failed = None;
                    tracing::info!(plugins = ?host.names(), "plugins reloaded after a file change");
                }
                Ok(Err(e)) => {
                    last_failed = Some(now);
                    tracing::warn!(error = %e, "plugin reload failed; keeping the previous set");
                }
                Err(e) => tracing::warn!(error = %e, "plugin reload task failed"),
            }
        }
    }))
}

fn normalize_config(config: &serde_json::Value) -> serde_json::Value {
    match config {
        serde_json::Value::Null => serde_json::Value::Object(serde_json::Map::new()),
        other => other.clone(),
    }
}

fn failure(plugin: &LoadedPlugin, hook: Hook, kind: FailureKind, message: String) -> PluginFailure {
    PluginFailure {
        plugin: plugin.manifest.name.clone(),
        hook: hook.as_str().into(),
        kind,
        policy: plugin.manifest.failure_policy,
        message,
    }
}

fn failure_of_join(name: &str, hook: Hook, e: &tokio::task::JoinError) -> PluginFailure {
    PluginFailure {
        plugin: name.into(),
        hook: hook.as_str().into(),
        kind: FailureKind::Unavailable,
        // The policy is unknown here; failing closed is the safe reading of a host-side crash.
        policy: FailurePolicy::FailClosed,
        message: format!("plugin call task failed: {e}"),
    }
}

/// Shared call wrapper: breaker check, timing, stats and breaker update.
fn guarded<T>(
    plugin: &LoadedPlugin,
    hook: Hook,
    call: impl FnOnce() -> Result<T, (FailureKind, String)>,
) -> Result<T, PluginFailure> {
    if let Some(left) = plugin.breaker.blocked(Instant::now()) {
        plugin.counters.record_refused();
        return Err(failure(
            plugin,
            hook,
            FailureKind::Disabled,
            format!(
                "disabled after repeated failures; retried in {} ms",
                left.as_millis()
            ),
        ));
    }
    let started = Instant::now();
    let result = call();
    let elapsed = started.elapsed();
    let kind = result.as_ref().err().map(|(k, _)| *k);
    plugin.counters.record(elapsed, kind);
    plugin.breaker.record(
        result.is_ok(),
        Instant::now(),
        plugin.breaker_threshold,
        plugin.cooldown,
    );
    result.map_err(|(kind, message)| {
        tracing::warn!(plugin = %plugin.name, hook = hook.as_str(), ?kind, %message, "plugin call failed");
        failure(plugin, hook, kind, message)
    })
}

fn run_before(
    plugin: &LoadedPlugin,
    ctx: &BeforeContext,
    config: &str,
) -> Result<BeforeOutcome, PluginFailure> {
    guarded(plugin, Hook::BeforeGenerate, || {
        let collected = plugin
            .prepared
            .call_before(&plugin.name, plugin.limits, ctx, config)
            .map_err(|e| (e.kind, e.message))?;
        let result = collected
            .result
            .map_err(|e| (FailureKind::PluginError, truncate_msg(e)))?;
        let mut outcome = runtime::from_wit_before(result);
        outcome.memories = collected.memories;
        outcome.logs = collected.logs;
        validate_before(plugin, &outcome)?;
        Ok(outcome)
    })
}

fn run_after(
    plugin: &LoadedPlugin,
    ctx: &AfterContext,
    config: &str,
    reply: &str,
) -> Result<AfterOutcome, PluginFailure> {
    guarded(plugin, Hook::AfterGenerate, || {
        let collected = plugin
            .prepared
            .call_after(&plugin.name, plugin.limits, ctx, config, reply)
            .map_err(|e| (e.kind, e.message))?;
        let result = collected
            .result
            .map_err(|e| (FailureKind::PluginError, truncate_msg(e)))?;
        let mut outcome = runtime::from_wit_after(result);
        outcome.memories = collected.memories;
        outcome.logs = collected.logs;
        validate_after(plugin, &outcome)?;
        Ok(outcome)
    })
}

fn truncate_msg(mut s: String) -> String {
    if s.len() > 512 {
        let mut cut = 512;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

fn check_state(plugin: &LoadedPlugin, state: Option<&String>) -> Result<(), (FailureKind, String)> {
    let Some(state) = state else { return Ok(()) };
    if state.len() > plugin.max_state {
        return Err((
            FailureKind::OutputTooLarge,
            format!(
                "state is {} bytes; the limit is {}",
                state.len(),
                plugin.max_state
            ),
        ));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(state).map_err(|e| {
        (
            FailureKind::InvalidOutput,
            format!("state is not JSON: {e}"),
        )
    })?;
    Ok(())
}

fn check_size(plugin: &LoadedPlugin, total: usize) -> Result<(), (FailureKind, String)> {
    if total > plugin.max_output {
        return Err((
            FailureKind::OutputTooLarge,
            format!(
                "output is {total} bytes; the limit is {}",
                plugin.max_output
            ),
        ));
    }
    Ok(())
}

fn check_role(role: &str) -> Result<(), (FailureKind, String)> {
    if ROLES.contains(&role) {
        Ok(())
    } else {
        Err((
            FailureKind::InvalidOutput,
            format!("role {role:?} is not system, user or assistant"),
        ))
    }
}

fn memories_size(m: &[MemoryEntry]) -> usize {
    m.iter()
        .map(|e| e.content.len() + e.kind.len() + e.tags.iter().map(String::len).sum::<usize>())
        .sum()
}

fn validate_before(plugin: &LoadedPlugin, o: &BeforeOutcome) -> Result<(), (FailureKind, String)> {
    let mut total = o.user_message.as_ref().map_or(0, String::len)
        + o.reply.as_ref().map_or(0, String::len)
        + memories_size(&o.memories);
    if let Some(prompt) = &o.prompt {
        for m in prompt {
            check_role(&m.role)?;
            total += m.content.len();
        }
    }
    for s in &o.sections {
        check_role(&s.role)?;
        total += s.content.len();
    }
    check_size(plugin, total)?;
    check_state(plugin, o.state.as_ref())
}

fn validate_after(plugin: &LoadedPlugin, o: &AfterOutcome) -> Result<(), (FailureKind, String)> {
    let text = match &o.action {
        ReplyAction::Keep => 0,
        ReplyAction::Rewrite(s) => s.len(),
        ReplyAction::Veto(reason) => {
            if reason.len() > MAX_VETO_REASON {
                return Err((
                    FailureKind::OutputTooLarge,
                    format!("veto reason is longer than {MAX_VETO_REASON} bytes"),
                ));
            }
            reason.len()
        }
    };
    check_size(plugin, text + memories_size(&o.memories))?;
    check_state(plugin, o.state.as_ref())
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.len().hash(&mut h);
    bytes.hash(&mut h);
    h.finish()
}

/// Sub-folders of `dir` that hold a `plugin.toml`, sorted. A missing dir holds none.
fn plugin_folders(dir: &Path) -> Result<Vec<PathBuf>, PluginError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(PluginError::Dir {
                path: dir.display().to_string(),
                message: e.to_string(),
            })
        }
    };
    let mut folders: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("plugin.toml").is_file())
        .collect();
    folders.sort();
    Ok(folders)
}

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = Vec::new();
    let Ok(folders) = plugin_folders(dir) else {
        return out;
    };
    for folder in folders {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            if let Ok(meta) = entry.metadata() {
                if meta.is_file() {
                    out.push((entry.path(), meta.len(), meta.modified().ok()));
                }
            }
        }
    }
    out.sort();
    out
}
