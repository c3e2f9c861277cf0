//! Loading the configuration: defaults, then an optional TOML file
//! (`--config`), then `PAYGATE_*` environment variables (DESIGN.md §11).
//!
//! `figment` is used because it layers these sources and reports the key a
//! bad value came from. Unknown keys are errors (typos must not be silently
//! ignored); `PAYGATE_TEST_*` variables belong to the test suite and are
//! skipped.

use std::path::Path;

use anyhow::{bail, Context};
use figment::{
    providers::{Env, Format, Toml},
    Figment,
};
use paygate_core::Config;

/// Loads and validates the configuration.
///
/// # Errors
/// A missing `--config` file, an unknown key, a value of the wrong type, or
/// a value that fails [`Config::validate`]; each message names the key.
pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let mut figment = Figment::new();
    if let Some(p) = path {
        if !p.is_file() {
            bail!("config file {} not found", p.display());
        }
        figment = figment.merge(Toml::file(p));
    }
    figment = figment.merge(Env::prefixed("PAYGATE_").filter(|k| !k.as_str().starts_with("test_")));
    let config: Config = figment.extract().context("invalid configuration")?;
    config.validate()?;
    Ok(config)
}
