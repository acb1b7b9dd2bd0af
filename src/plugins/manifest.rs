//! `plugin.toml`: a plugin's name, version, hooks, failure policy, limits and config schema.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The hooks a plugin may implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    /// Runs before the upstream call.
    BeforeGenerate,
    /// Runs on the finished reply.
    AfterGenerate,
}

impl Hook {
    /// The WIT name of the hook.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::BeforeGenerate => "before-generate",
            Hook::AfterGenerate => "after-generate",
        }
    }
}

/// What the caller does when this plugin fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Skip the plugin, note it in the response metadata, carry on.
    #[default]
    FailOpen,
    /// Fail the request with `PLUGIN_FAILED` (502).
    FailClosed,
}

/// Per-plugin limits; each may only tighten the host-wide `[plugins]` value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ManifestLimits {
    /// Per-call deadline in ms.
    pub timeout_ms: Option<u64>,
    /// Linear-memory cap in MiB.
    pub memory_mib: Option<u32>,
    /// Output cap in bytes.
    pub max_output_bytes: Option<usize>,
    /// State cap in bytes.
    pub max_state_bytes: Option<usize>,
}

/// A parsed `plugin.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    /// Unique plugin name (`[a-z0-9-]`, also what a character binding names).
    pub name: String,
    /// The plugin's own version (semver recommended), reported in stats.
    pub version: String,
    /// Shown to admins.
    #[serde(default)]
    pub description: String,
    /// Component file, relative to the plugin folder.
    #[serde(default = "default_component")]
    pub component: PathBuf,
    /// The hooks the host calls; a hook not listed is never called.
    pub hooks: Vec<Hook>,
    /// What a failure of this plugin does to the request.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Tighter limits for this plugin.
    #[serde(default)]
    pub limits: ManifestLimits,
    /// JSON Schema (subset, see `schema`) that a character's plugin config must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_schema: Option<serde_json::Value>,
}

fn default_component() -> PathBuf {
    PathBuf::from("plugin.wasm")
}

impl Manifest {
    /// Parses and checks a manifest; the error says what to fix.
    pub fn parse(text: &str) -> Result<Self, String> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| e.to_string())?;
        manifest.check()?;
        Ok(manifest)
    }

    /// Reads `<folder>/plugin.toml`.
    pub fn read(folder: &Path) -> Result<Self, String> {
        let path = folder.join("plugin.toml");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn check(&self) -> Result<(), String> {
        let valid = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!(
                "plugin name `{}` must be 1-64 characters of a-z, 0-9, - or _",
                self.name
            ));
        }
        if self.version.trim().is_empty() {
            return Err("version must not be empty".into());
        }
        if self.hooks.is_empty() {
            return Err("hooks must list before-generate and/or after-generate".into());
        }
        if self.component.is_absolute()
            || self
                .component
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err("component must be a path inside the plugin folder".into());
        }
        if let Some(schema) = &self.config_schema {
            if !schema.is_object() {
                return Err("config-schema must be a table (a JSON Schema object)".into());
            }
        }
        Ok(())
    }

    /// Whether the host should call `hook` on this plugin.
    pub fn has_hook(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_manifest() {
        let m = Manifest::parse(
            r#"
name = "dice"
version = "1.2.0"
hooks = ["before-generate"]
failure-policy = "fail-closed"
[limits]
timeout-ms = 20
[config-schema]
type = "object"
properties.maxDice = { type = "integer", minimum = 1 }
"#,
        );
        let m = match m {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(m.failure_policy, FailurePolicy::FailClosed);
        assert_eq!(m.limits.timeout_ms, Some(20));
        assert_eq!(m.component, PathBuf::from("plugin.wasm"));
        assert!(m.has_hook(Hook::BeforeGenerate) && !m.has_hook(Hook::AfterGenerate));
    }

    #[test]
    fn rejects_bad_manifests() {
        for bad in [
            "name = \"Bad Name\"\nversion = \"1\"\nhooks = [\"before-generate\"]",
            "name = \"a\"\nversion = \"1\"\nhooks = []",
            "name = \"a\"\nversion = \"1\"\nhooks = [\"during\"]",
            "name = \"a\"\nversion = \"1\"\nhooks = [\"after-generate\"]\ncomponent = \"../x.wasm\"",
            "name = \"a\"\nversion = \"1\"\nhooks = [\"after-generate\"]\nsurprise = 1",
        ] {
            assert!(Manifest::parse(bad).is_err(), "accepted: {bad}");
        }
    }
}
