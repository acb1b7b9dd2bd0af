//! Plugin test support: builds the guest workspace (`plugins/`) for wasm32-wasip2 once per test
//! process and lays out plugin dirs (component + `plugin.toml`) in temp folders.
//!
//! The build needs nothing preinstalled beyond rustup: the wasm32-wasip2 target is added when
//! missing (machines here set `RUSTUP_AUTO_INSTALL=0`, so `rust-toolchain.toml` alone would not
//! fetch it). Concurrent test binaries are serialized by cargo's own lock on `plugins/target`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The guest target.
pub const TARGET: &str = "wasm32-wasip2";

/// The guest workspace.
pub fn guest_workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins")
}

fn ensure_target() -> Result<(), String> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match out {
        Ok(out)
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == TARGET) =>
        {
            Ok(())
        }
        Ok(_) => {
            let status = Command::new("rustup")
                .args(["target", "add", TARGET])
                .status()
                .map_err(|e| format!("cannot run rustup: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("`rustup target add {TARGET}` failed: {status}"))
            }
        }
        // No rustup: assume a toolchain that already has the target (e.g. a distro rustc).
        Err(_) => Ok(()),
    }
}

fn build() -> Result<PathBuf, String> {
    ensure_target()?;
    let ws = guest_workspace();
    let target_dir = ws.join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&ws)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir)
        // The outer `cargo test` may export flags meant for the host build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the guest plugins failed: {status}"));
    }
    Ok(target_dir.join(TARGET).join("release"))
}

/// Builds every guest component once per process; returns the folder with the `.wasm` files.
pub fn wasm_dir() -> &'static Path {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build) {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    }
}

/// Path of one built component, by crate name with underscores (e.g. `taproom_plugin_dice`).
pub fn wasm(crate_name: &str) -> PathBuf {
    wasm_dir().join(format!("{crate_name}.wasm"))
}

/// A temp plugins dir.
pub struct PluginsDir {
    tmp: tempfile::TempDir,
}

impl PluginsDir {
    /// An empty plugins dir.
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
        }
    }

    /// The dir (for `PluginsConfig::dir`).
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Installs `crate_name`'s component as `<folder>/plugin.wasm` with this manifest.
    pub fn install(&self, folder: &str, crate_name: &str, manifest: &str) -> &Self {
        let dir = self.tmp.path().join(folder);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
        std::fs::copy(wasm(crate_name), dir.join("plugin.wasm"))
            .unwrap_or_else(|e| panic!("copy {crate_name}: {e}"));
        std::fs::write(dir.join("plugin.toml"), manifest).unwrap_or_else(|e| panic!("write: {e}"));
        self
    }

    /// Installs with a generated manifest: name = folder, version, hooks, policy, extra lines.
    pub fn add(
        &self,
        name: &str,
        crate_name: &str,
        hooks: &str,
        policy: &str,
        extra: &str,
    ) -> &Self {
        let manifest = format!(
            "name = \"{name}\"\nversion = \"1.0.0\"\nhooks = [{hooks}]\nfailure-policy = \"{policy}\"\n{extra}\n"
        );
        self.install(name, crate_name, &manifest)
    }
}

/// Both hooks, for generated manifests.
pub const BOTH: &str = "\"before-generate\", \"after-generate\"";
/// Before-generate only.
pub const BEFORE: &str = "\"before-generate\"";
/// After-generate only.
pub const AFTER: &str = "\"after-generate\"";
