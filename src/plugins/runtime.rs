//! The wasmtime side: engine and pooling allocator, per-plugin linker and `InstancePre`, the
//! per-call `Store` with its limits, the host imports, and WIT <-> host type conversion.
//! This is the only file that knows wasmtime.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap,
};

use super::types::{
    self as t, FailureKind, LogLevel, MemoryEntry, PluginLog, RecallFn, ReplyAction,
};

mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "plugins/wit",
    });
}

use bindings::taproom::plugin::host::{self as wit_host, Level};
use bindings::taproom::plugin::types as w;

/// One epoch tick. Deadlines are rounded up to whole ticks, so a call may run at most one tick
/// past its budget; 5 ms keeps the ticker thread's wake-ups cheap on a small machine.
pub(crate) const TICK: Duration = Duration::from_millis(5);

/// Most log lines a single call may emit; the rest are counted and dropped.
const MAX_LOG_LINES: usize = 32;
/// Longest log line kept, in bytes.
const MAX_LOG_BYTES: usize = 1024;
/// Most memories a single call may add.
const MAX_MEMORIES: usize = 16;
/// Largest `limit` a recall may ask for.
const MAX_RECALL: u32 = 32;

/// The engine plus the thread that advances its epoch.
pub(crate) struct Runtime {
    pub(crate) engine: Engine,
    ticker: Arc<Ticker>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let mut state = self.ticker.lock();
        state.stop = true;
        self.ticker.wake.notify_all();
    }
}

/// What the epoch ticker thread waits on: it ticks only while a call is running, so an idle
/// server (most of the time on a small machine) is not woken 200 times a second.
#[derive(Default)]
struct Ticker {
    state: Mutex<TickerState>,
    wake: Condvar,
}

#[derive(Default)]
struct TickerState {
    /// Stores (calls) alive now.
    calls: usize,
    /// The runtime was dropped: the thread exits.
    stop: bool,
}

impl Ticker {
    /// A poisoned lock only means a call panicked while counting; the count is still usable.
    fn lock(&self) -> MutexGuard<'_, TickerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `tick` (which advances the engine's epoch) every [`TICK`] while any call is alive;
    /// returns once stopped.
    fn run(&self, tick: impl Fn()) {
        loop {
            {
                let mut state = self.lock();
                while state.calls == 0 && !state.stop {
                    state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                if state.stop {
                    return;
                }
            }
            std::thread::sleep(TICK);
            tick();
        }
    }

    /// Counts a call as alive until the guard is dropped (with its store).
    fn call(self: &Arc<Self>) -> Ticking {
        let mut state = self.lock();
        state.calls += 1;
        if state.calls == 1 {
            self.wake.notify_all();
        }
        Ticking(self.clone())
    }
}

/// Keeps the ticker running while a call's store is alive.
struct Ticking(Arc<Ticker>);

impl Drop for Ticking {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.calls = state.calls.saturating_sub(1);
    }
}

impl Runtime {
    /// Builds the engine: Cranelift, component model, epoch interruption and a pooling allocator
    /// sized to `max_instances` concurrent calls with `memory_bytes` of linear memory each.
    pub(crate) fn new(max_instances: u32, memory_bytes: u64) -> Result<Self, String> {
        let mut pool = PoolingAllocationConfig::default();
        // A Rust wasip2 component has a handful of core instances (main module plus shims) and
        // one or two memories; leave headroom but size totals to real concurrency because every
        // memory slot reserves virtual address space up front.
        pool.total_component_instances(max_instances)
            .total_core_instances(max_instances.saturating_mul(16))
            .total_memories(max_instances.saturating_mul(2))
            .total_tables(max_instances.saturating_mul(4))
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .max_core_instances_per_component(32)
            .max_memory_size(usize::try_from(memory_bytes).map_err(|e| e.to_string())?);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            // Reserve only the cap (plus a small guard) per memory slot instead of the 4 GiB +
            // guard default: bounds checks become explicit, which is cheap for these plugins.
            .memory_reservation(memory_bytes)
            .memory_guard_size(64 * 1024)
            .memory_reservation_for_growth(0)
            .max_wasm_stack(512 * 1024)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| e.to_string())?;
        let ticker = Arc::new(Ticker::default());
        let (ticker_engine, thread_ticker) = (engine.clone(), ticker.clone());
        std::thread::Builder::new()
            .name("taproom-plugin-epoch".into())
            .spawn(move || thread_ticker.run(|| ticker_engine.increment_epoch()))
            .map_err(|e| format!("cannot start the epoch ticker: {e}"))?;
        Ok(Self { engine, ticker })
    }

    /// Compiles a component (the expensive step, done once per distinct file content).
    pub(crate) fn compile(&self, bytes: &[u8]) -> Result<Compiled, String> {
        Component::new(&self.engine, bytes)
            .map(Compiled)
            .map_err(|e| format!("{e:#}"))
    }

    /// Links a compiled component against the host imports and pre-instantiates it.
    pub(crate) fn prepare(&self, compiled: &Compiled) -> Result<Prepared, String> {
        let component = &compiled.0;
        let mut linker: Linker<CallState> = Linker::new(&self.engine);
        bindings::Plugin::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |s| s)
            .map_err(|e| format!("{e:#}"))?;
        // Rust's wasm32-wasip2 std imports a few `wasi:*` interfaces (environment, exit,
        // stdio streams, …). Plugins get none of them: every such import is a stub that traps
        // when called, so the component links but cannot reach the outside world.
        linker
            .define_unknown_imports_as_traps(component)
            .map_err(|e| format!("{e:#}"))?;
        let pre = linker
            .instantiate_pre(component)
            .map_err(|e| format!("{e:#}"))?;
        let pre = bindings::PluginPre::new(pre).map_err(|e| {
            format!("component does not implement taproom:plugin@0.1.0 (plugin world): {e:#}")
        })?;
        let mut imports: Vec<String> = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        imports.sort();
        Ok(Prepared {
            pre,
            imports,
            ticker: self.ticker.clone(),
        })
    }
}

/// A compiled component (cheap to clone: the code is shared).
#[derive(Clone)]
pub(crate) struct Compiled(Component);

/// A linked, pre-instantiated plugin, ready for a fresh `Store` per call.
#[derive(Clone)]
pub(crate) struct Prepared {
    pre: bindings::PluginPre<CallState>,
    /// The component's import names (ours plus the `wasi:*` ones stubbed as traps).
    pub(crate) imports: Vec<String>,
    /// Runs the epoch ticker while a call's store is alive.
    ticker: Arc<Ticker>,
}

/// Limits applied to one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallLimits {
    pub(crate) timeout: Duration,
    pub(crate) memory_bytes: usize,
}

/// Caps linear memory and tables; remembers that it refused so a resulting trap is reported
/// as a memory-limit failure rather than a generic trap.
struct Limiter {
    memory_bytes: usize,
    hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Per-call store data: limits, the seeded random source and what the imports collected.
pub(crate) struct CallState {
    limiter: Limiter,
    rng: u64,
    recall: Option<RecallFn>,
    plugin: Arc<str>,
    pub(crate) memories: Vec<MemoryEntry>,
    pub(crate) logs: Vec<PluginLog>,
    dropped_logs: u32,
    /// Keeps the epoch ticking (so the call's deadline can fire) while the store lives.
    _ticking: Ticking,
}

impl wit_host::Host for CallState {
    fn log(&mut self, level: Level, message: String) {
        if self.logs.len() >= MAX_LOG_LINES {
            self.dropped_logs = self.dropped_logs.saturating_add(1);
            return;
        }
        let message = truncate(message, MAX_LOG_BYTES);
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
        self.logs.push(PluginLog { level, message });
    }

    fn now_ms(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn random_u64(&mut self) -> u64 {
        // SplitMix64: tiny, fast and fully determined by the per-call seed.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn recall(&mut self, query: String, limit: u32) -> Vec<String> {
        let limit = limit.min(MAX_RECALL);
        match &self.recall {
            Some(f) if limit > 0 => {
                let mut found = f(&query, limit);
                found.truncate(limit as usize);
                found
            }
            _ => Vec::new(),
        }
    }

    fn remember(&mut self, entry: w::MemoryEntry) {
        if self.memories.len() >= MAX_MEMORIES {
            return;
        }
        self.memories.push(MemoryEntry {
            content: entry.content,
            kind: entry.kind,
            importance: if entry.importance.is_finite() {
                entry.importance.clamp(0.0, 1.0)
            } else {
                0.0
            },
            tags: entry.tags,
        });
    }
}

impl w::Host for CallState {}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// A failed call before output validation.
pub(crate) struct CallError {
    pub(crate) kind: FailureKind,
    pub(crate) message: String,
}

/// Raw hook results plus what the imports collected.
pub(crate) struct Collected<R> {
    pub(crate) result: R,
    pub(crate) memories: Vec<MemoryEntry>,
    pub(crate) logs: Vec<PluginLog>,
}

impl Prepared {
    fn store(
        &self,
        plugin: &Arc<str>,
        limits: CallLimits,
        ctx: &t::CallContext,
    ) -> Store<CallState> {
        let engine = self.pre.engine();
        let mut store = Store::new(
            engine,
            CallState {
                limiter: Limiter {
                    memory_bytes: limits.memory_bytes,
                    hit: false,
                },
                rng: ctx.seed,
                recall: ctx.recall.clone(),
                plugin: plugin.clone(),
                memories: Vec::new(),
                logs: Vec::new(),
                dropped_logs: 0,
                _ticking: self.ticker.call(),
            },
        );
        store.limiter(|s| &mut s.limiter);
        let ticks = limits.timeout.as_millis().div_ceil(TICK.as_millis()) + 1;
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store
    }

    /// Instantiates into a fresh store and calls before-generate. The store is dropped on
    /// return, so a trapped instance is never entered again.
    pub(crate) fn call_before(
        &self,
        plugin: &Arc<str>,
        limits: CallLimits,
        ctx: &t::BeforeContext,
        config: &str,
    ) -> Result<Collected<Result<w::BeforeResult, String>>, CallError> {
        let mut store = self.store(plugin, limits, &ctx.base);
        let input = to_wit_before(ctx, config);
        let outcome = self
            .pre
            .instantiate(&mut store)
            .and_then(|instance| instance.call_before_generate(&mut store, &input));
        finish(store, outcome)
    }

    /// Instantiates into a fresh store and calls after-generate.
    pub(crate) fn call_after(
        &self,
        plugin: &Arc<str>,
        limits: CallLimits,
        ctx: &t::CallContext,
        config: &str,
        reply: &str,
    ) -> Result<Collected<Result<w::AfterResult, String>>, CallError> {
        let mut store = self.store(plugin, limits, ctx);
        let input = to_wit_call(ctx, config);
        let outcome = self
            .pre
            .instantiate(&mut store)
            .and_then(|instance| instance.call_after_generate(&mut store, &input, reply));
        finish(store, outcome)
    }
}

fn finish<R>(
    store: Store<CallState>,
    outcome: wasmtime::Result<R>,
) -> Result<Collected<R>, CallError> {
    let state = store.into_data();
    if state.dropped_logs > 0 {
        tracing::debug!(
            plugin = &*state.plugin,
            dropped = state.dropped_logs,
            "plugin log lines dropped"
        );
    }
    match outcome {
        Ok(result) => Ok(Collected {
            result,
            memories: state.memories,
            logs: state.logs,
        }),
        Err(e) => Err(classify(&e, state.limiter.hit)),
    }
}

fn classify(e: &wasmtime::Error, memory_hit: bool) -> CallError {
    // The root cause reads best ("wasm `unreachable` instruction executed", "unknown import:
    // `wasi:cli/stderr…`"); the wasm backtrace context around it is noise for an API client.
    let message = match e.downcast_ref::<Trap>() {
        Some(trap) => format!("wasm trap: {trap}"),
        None => {
            let root = e.root_cause().to_string();
            match root.strip_prefix("unknown import: ") {
                Some(rest) => format!(
                    "the plugin called {}, a WASI import plugins are denied",
                    rest.trim_end_matches(" has not been defined")
                ),
                None => root,
            }
        }
    };
    // A refused memory growth is the root cause of whatever follows it (an allocation-failure
    // abort, or spinning until the deadline), so it wins over the trap code.
    let kind = match e.downcast_ref::<Trap>() {
        _ if memory_hit => FailureKind::MemoryLimit,
        Some(Trap::Interrupt) => FailureKind::Timeout,
        Some(_) => FailureKind::Trap,
        // Instantiation errors (pool exhausted, …) and denied WASI imports carry no trap code.
        None if message.contains("WASI import") => FailureKind::Trap,
        None => FailureKind::Unavailable,
    };
    let message = match kind {
        FailureKind::Timeout => "the call ran past its deadline".to_string(),
        FailureKind::MemoryLimit => "the plugin hit its memory cap".to_string(),
        _ => truncate(message.replace('\n', " "), 512),
    };
    CallError { kind, message }
}

fn to_wit_call(ctx: &t::CallContext, config: &str) -> w::CallContext {
    w::CallContext {
        config: config.to_string(),
        state: ctx.state.clone(),
        conversation_id: ctx.conversation_id.clone(),
        character: w::Character {
            id: ctx.character.id.clone(),
            name: ctx.character.name.clone(),
            description: ctx.character.description.clone(),
            personality: ctx.character.personality.clone(),
            scenario: ctx.character.scenario.clone(),
            first_mes: ctx.character.first_mes.clone(),
            tags: ctx.character.tags.clone(),
        },
        user_name: ctx.user_name.clone(),
        user_message: ctx.user_message.clone(),
        history: ctx
            .history
            .iter()
            .map(|m| w::HistoryMessage {
                role: m.role.clone(),
                name: m.name.clone(),
                content: m.content.clone(),
            })
            .collect(),
    }
}

fn to_wit_before(ctx: &t::BeforeContext, config: &str) -> w::BeforeContext {
    w::BeforeContext {
        base: to_wit_call(&ctx.base, config),
        prompt: ctx
            .prompt
            .iter()
            .map(|m| w::PromptMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect(),
    }
}

/// The WIT before-result as host types (validated by the caller).
pub(crate) fn from_wit_before(r: w::BeforeResult) -> t::BeforeOutcome {
    t::BeforeOutcome {
        user_message: r.user_message,
        prompt: r.prompt.map(|p| {
            p.into_iter()
                .map(|m| t::PromptMessage {
                    role: m.role,
                    content: m.content,
                })
                .collect()
        }),
        sections: r
            .sections
            .into_iter()
            .map(|s| t::PromptSection {
                content: s.content,
                role: s.role,
                position: match s.position {
                    w::SectionPosition::System => t::SectionPosition::System,
                    w::SectionPosition::BeforeHistory => t::SectionPosition::BeforeHistory,
                    w::SectionPosition::AfterHistory => t::SectionPosition::AfterHistory,
                    w::SectionPosition::Depth(d) => t::SectionPosition::Depth(d),
                },
            })
            .collect(),
        memories: Vec::new(),
        state: r.state,
        reply: r.reply,
        logs: Vec::new(),
    }
}

/// The WIT after-result as host types (validated by the caller).
pub(crate) fn from_wit_after(r: w::AfterResult) -> t::AfterOutcome {
    t::AfterOutcome {
        action: match r.action {
            w::ReplyAction::Keep => ReplyAction::Keep,
            w::ReplyAction::Rewrite(s) => ReplyAction::Rewrite(s),
            w::ReplyAction::Veto(s) => ReplyAction::Veto(s),
        },
        memories: Vec::new(),
        state: r.state,
        logs: Vec::new(),
    }
}

#[cfg(test)]
mod ticker_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    #[test]
    fn the_ticker_ticks_only_while_a_call_is_alive() {
        let ticker = Arc::new(Ticker::default());
        let ticks = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (ticker, ticks) = (ticker.clone(), ticks.clone());
            std::thread::spawn(move || {
                ticker.run(|| {
                    ticks.fetch_add(1, Ordering::SeqCst);
                })
            })
        };
        std::thread::sleep(TICK * 10);
        assert_eq!(ticks.load(Ordering::SeqCst), 0, "no call, no ticks");
        let call = ticker.call();
        let started = Instant::now();
        while ticks.load(Ordering::SeqCst) < 2 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a call must be ticked"
            );
            std::thread::sleep(TICK);
        }
        drop(call);
        {
            let mut state = ticker.lock();
            assert_eq!(state.calls, 0);
            state.stop = true;
            ticker.wake.notify_all();
        }
        thread.join().unwrap();
    }
}
