//! Loading the configuration: defaults, then an optional TOML file
//! (`--config`), then `PAYGATE_*` environment variables (DESIGN.md §11).
//!
//! `figment` is used because it layers these sources and reports the key a
//! bad value came from. Unknown keys are errors (typos must not be silently
//! ignored); `PAYGATE_TEST_*` variables belong to the test suite and are
//! skipped. Nested tables (the per-downstream policies) are set in the
//! environment with `__`: `PAYGATE_CARD_API_POLICY__BULKHEAD_MAX_CONCURRENT=20`
//! is `[card_api_policy] bulkhead_max_concurrent = 20`; keys left out keep
//! that downstream's own defaults.

use std::path::Path;

use anyhow::{bail, Context};
use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use paygate_core::{config::DownstreamPolicy, Config};

/// The per-downstream defaults, so a partial `[card_api_policy]` table keeps
/// the card API's own defaults for the keys it leaves out.
#[derive(serde::Serialize)]
struct PolicyDefaults {
    card_api_policy: DownstreamPolicy,
    ledger_api_policy: DownstreamPolicy,
}

/// Loads and validates the configuration.
///
/// # Errors
/// A missing `--config` file, an unknown key, a value of the wrong type, or
/// a value that fails [`Config::validate`]; each message names the key.
pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let mut figment = Figment::from(Serialized::defaults(PolicyDefaults {
        card_api_policy: DownstreamPolicy::card_api(),
        ledger_api_policy: DownstreamPolicy::ledger_api(),
    }));
    if let Some(p) = path {
        if !p.is_file() {
            bail!("config file {} not found", p.display());
        }
        figment = figment.merge(Toml::file(p));
    }
    figment = figment.merge(
        Env::prefixed("PAYGATE_")
            // Keys arrive as written (`TEST_POSTGRES_URL`): compare uncased.
            .filter(|k| !k.as_str().to_ascii_lowercase().starts_with("test_"))
            .split("__"),
    );
    let config: Config = figment.extract().context("invalid configuration")?;
    config.validate()?;
    Ok(config)
}
