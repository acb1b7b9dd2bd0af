//! `[plugins]` configuration: where plugins live and the host-wide per-call limits.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

/// The `[plugins]` config section. Every field has a default, so an absent section means
/// "load whatever is in `./plugins.d`, with the documented limits".
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Folder with one sub-folder per plugin (`plugin.toml` + component). Missing = no plugins.
    pub dir: PathBuf,
    /// Wall-clock budget of one hook call (instantiate + run), in ms.
    pub timeout_ms: u64,
    /// Linear-memory cap of one call, in MiB.
    pub memory_mib: u32,
    /// Largest total size of the strings a hook may return, in bytes.
    pub max_output_bytes: usize,
    /// Largest per-conversation state a plugin may keep, in bytes of JSON.
    pub max_state_bytes: usize,
    /// Consecutive failures after which a plugin is disabled for `cooldown_ms`.
    pub failure_threshold: u32,
    /// How long a failing plugin stays disabled, in ms.
    pub cooldown_ms: u64,
    /// Hook calls running at once; also sizes the pooling allocator (memory reserved up front).
    pub max_concurrent_instances: u32,
    /// Reload automatically when a file in `dir` changes.
    pub watch: bool,
    /// How often the watcher looks at `dir`, in ms.
    pub watch_interval_ms: u64,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./plugins.d"),
            timeout_ms: 50,
            memory_mib: 32,
            max_output_bytes: 256 * 1024,
            max_state_bytes: 16 * 1024,
            failure_threshold: 5,
            cooldown_ms: 30_000,
            max_concurrent_instances: 16,
            watch: true,
            watch_interval_ms: 1_000,
        }
    }
}

impl PluginsConfig {
    /// The environment variable that overrides `dir`.
    pub const ENV_DIR: &'static str = "TAPROOM_PLUGINS_DIR";

    /// Applies environment overrides (`TAPROOM_PLUGINS_DIR`); an empty value is ignored.
    pub fn apply_env(&mut self, env: &HashMap<String, String>) {
        if let Some(dir) = env.get(Self::ENV_DIR).filter(|d| !d.is_empty()) {
            self.dir = PathBuf::from(dir);
        }
    }

    /// Checks the values that would make the host unusable; messages say what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.timeout_ms == 0 || self.timeout_ms > 60_000 {
            return Err("plugins.timeout_ms must be between 1 and 60000".into());
        }
        if self.memory_mib == 0 || self.memory_mib > 4096 {
            return Err("plugins.memory_mib must be between 1 and 4096".into());
        }
        if self.max_concurrent_instances == 0 || self.max_concurrent_instances > 1024 {
            return Err("plugins.max_concurrent_instances must be between 1 and 1024".into());
        }
        if self.failure_threshold == 0 {
            return Err("plugins.failure_threshold must be at least 1".into());
        }
        if self.max_output_bytes == 0 || self.max_state_bytes == 0 {
            return Err("plugins.max_output_bytes and max_state_bytes must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_dir_and_unknown_keys_are_rejected() {
        let mut cfg = PluginsConfig::default();
        let env = HashMap::from([(PluginsConfig::ENV_DIR.to_string(), "/srv/p".to_string())]);
        cfg.apply_env(&env);
        assert_eq!(cfg.dir, PathBuf::from("/srv/p"));
        let parsed: Result<PluginsConfig, _> = toml::from_str("timeout_ms = 20\nbogus = 1");
        assert!(parsed.is_err());
        let parsed: PluginsConfig = toml::from_str("timeout_ms = 20").unwrap_or_default();
        assert_eq!(parsed.timeout_ms, 20);
        assert_eq!(parsed.memory_mib, 32);
    }
}
