//! Configuration files and values shared by the service binaries.

use serde::de::DeserializeOwned;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file {path}")]
    Read {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("failed to parse config: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range or inconsistent with another.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Parses a TOML document (with `deny_unknown_fields` on `T`, a typo does not pass silently).
///
/// # Errors
/// [`ConfigError::Parse`].
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    Ok(toml::from_str(text)?)
}

/// Reads and parses a TOML file.
///
/// # Errors
/// [`ConfigError::Read`] or [`ConfigError::Parse`].
pub fn from_file<T: DeserializeOwned>(path: &str) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    from_toml(&text)
}

/// A comma-separated list of URLs from one environment variable (blanks dropped).
pub fn url_list(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// This host's name, reduced to `[A-Za-z0-9._-]` (it names nodes and consumers); empty if
/// it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).collect())
        .unwrap_or_default()
}

/// The `--help` paragraph listing environment overrides: `(variable, setting it overrides)`.
pub fn env_help(vars: &[(&str, &str)]) -> String {
    let width = vars.iter().map(|(name, _)| name.len()).max().unwrap_or(0).max("RUST_LOG".len()) + 2;
    let mut s = String::from("Environment:\n");
    for (name, setting) in vars {
        s.push_str(&format!("  {name:<width$}overrides {setting}\n"));
    }
    s.push_str(&format!("  {:<width$}log filter (default: info)\n", "RUST_LOG"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_lists_drop_blanks() {
        assert_eq!(url_list(" redis://a:1/ ,, redis://b:2/,"), vec!["redis://a:1/", "redis://b:2/"]);
        assert!(url_list("").is_empty());
    }

    #[test]
    fn env_help_aligns_every_variable() {
        let help = env_help(&[("A_LONG_NAME", "x.y"), ("B", "z")]);
        assert!(help.contains("  A_LONG_NAME  overrides x.y\n"), "{help}");
        assert!(help.contains("  B            overrides z\n"), "{help}");
        assert!(help.contains("  RUST_LOG     log filter"), "{help}");
    }

    #[test]
    fn unreadable_and_unparsable_files_are_told_apart() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct C {
            a: u32,
        }
        assert!(matches!(from_file::<C>("/nonexistent/x.toml"), Err(ConfigError::Read { .. })));
        assert!(matches!(from_toml::<C>("b = 1"), Err(ConfigError::Parse(_))));
        assert_eq!(from_toml::<C>("a = 7").map(|c| c.a).ok(), Some(7));
    }
}
