//! The optional config file (`--config FILE`, TOML): the same keys as the run flags, spelled as
//! the flags are without their dashes (`max-voters = 5`, `join = ["10.0.0.2:7946"]`). A flag on
//! the command line or its environment variable wins over the file, and the file wins over the
//! built-in default.
//!
//! The file is turned into command-line arguments placed before the user's own, for the flags
//! that the command line and environment left at their defaults, and every value is checked by
//! the flag's own parser first, so a bad value is reported with the file, line and key rather
//! than as a flag the user never typed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// Why the config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("config file {path} could not be read")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {reason}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        reason: String,
    },
    /// A key that is not a run flag.
    #[error("config file {path}, line {line}: unknown key {key:?}; known keys: {known}")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key.
        line: usize,
        /// The key.
        key: String,
        /// Every key the file may hold.
        known: String,
    },
    /// A value the flag's parser refused, or of the wrong TOML type.
    #[error("config file {path}, line {line}: bad value for {key:?}: {reason}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key.
        line: usize,
        /// The key.
        key: String,
        /// What was wrong.
        reason: String,
    },
}

/// Arguments for the keys of `path` that `matches` (the command line and environment parsed
/// without the file) left at their defaults, to be placed before the user's own arguments.
/// `command` is the run command whose long flags are the keys; `skip` names flags a file may
/// not set (the `--config` flag itself, hidden test-only flags).
///
/// # Errors
/// [`ConfigFileError`] naming the file, and for a key the line and the key.
pub fn arguments_from_file(
    path: &Path,
    command: &Command,
    matches: &ArgMatches,
    skip: &[&str],
) -> Result<Vec<OsString>, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigFileError::Syntax {
                path: path.to_path_buf(),
                reason: e.to_string().trim_end().to_owned(),
            })?;
    let settable: Vec<&clap::Arg> = command
        .get_arguments()
        .filter(|a| a.get_long().is_some() && !a.is_hide_set())
        .filter(|a| !skip.contains(&a.get_id().as_str()))
        .collect();
    let mut args = Vec::new();
    for (key, value) in &table {
        let line = line_of_key(&text, key);
        let Some(arg) = settable.iter().find(|a| a.get_long() == Some(key.as_str())) else {
            let mut known: Vec<&str> = settable.iter().filter_map(|a| a.get_long()).collect();
            known.sort_unstable();
            return Err(ConfigFileError::UnknownKey {
                path: path.to_path_buf(),
                line,
                key: key.clone(),
                known: known.join(", "),
            });
        };
        let bad = |reason: String| ConfigFileError::BadValue {
            path: path.to_path_buf(),
            line,
            key: key.clone(),
            reason,
        };
        let flag = format!("--{key}");
        let takes_value = arg.get_action().takes_values();
        let values = match (value, takes_value) {
            (toml::Value::Boolean(on), false) => {
                if *on {
                    vec![]
                } else {
                    continue;
                }
            }
            (_, false) => return Err(bad("expected true or false".into())),
            (toml::Value::Array(items), true) => items
                .iter()
                .map(|item| scalar_text(item).ok_or_else(|| bad(type_reason(item))))
                .collect::<Result<Vec<_>, _>>()?,
            (scalar, true) => vec![scalar_text(scalar).ok_or_else(|| bad(type_reason(scalar)))?],
        };
        // Each value goes through the flag's own parser, in a command holding only that flag.
        let alone = Command::new("config")
            .no_binary_name(true)
            .arg((*arg).clone().required(false));
        for value in &values {
            alone
                .clone()
                .try_get_matches_from([format!("{flag}={value}")])
                .map_err(|e| bad(clap_reason(&e)))?;
        }
        let source = matches.value_source(arg.get_id().as_str());
        if matches!(
            source,
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        if values.is_empty() {
            args.push(OsString::from(&flag));
        }
        for value in values {
            args.push(OsString::from(format!("{flag}={value}")));
        }
    }
    Ok(args)
}

/// A TOML scalar as the text a flag would take; `None` for tables, arrays and dates.
fn scalar_text(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn type_reason(value: &toml::Value) -> String {
    format!("a {} is not a flag value", value.type_str())
}

/// clap's message for a refused value, without its "error:" prefix and usage lines.
fn clap_reason(error: &clap::Error) -> String {
    let text = error.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_owned()
}

/// The 1-based line where `key` is assigned at the top level of `text` (bare or quoted), or 1
/// when it cannot be found (a key written in dotted or inline-table form).
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            [key.to_owned(), format!("\"{key}\""), format!("'{key}'")]
                .iter()
                .any(|k| {
                    line.strip_prefix(k.as_str())
                        .is_some_and(|rest| rest.trim_start().starts_with('='))
                })
        })
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn command() -> Command {
        Command::new("t")
            .arg(
                Arg::new("max-voters")
                    .long("max-voters")
                    .env("T_MAX_VOTERS")
                    .default_value("5")
                    .value_parser(clap::value_parser!(usize)),
            )
            .arg(Arg::new("join").long("join").action(ArgAction::Append))
            .arg(Arg::new("rejoin").long("rejoin").action(ArgAction::SetTrue))
            .arg(Arg::new("config").long("config"))
            .arg(Arg::new("weaken").long("weaken").hide(true))
    }

    fn from(text: &str, argv: &[&str]) -> Result<Vec<String>, ConfigFileError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cellchat.toml");
        std::fs::write(&path, text).unwrap();
        let command = command();
        let matches = command
            .clone()
            .try_get_matches_from(std::iter::once("t").chain(argv.iter().copied()))
            .unwrap();
        arguments_from_file(&path, &command, &matches, &["config"])
            .map(|args| args.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn keys_become_flags_before_the_users_own() {
        let args = from(
            "max-voters = 3\njoin = [\"a:1\", \"b:2\"]\nrejoin = true\n",
            &[],
        )
        .unwrap();
        // In key order: a flag's place on the command line does not matter.
        assert_eq!(
            args,
            ["--join=a:1", "--join=b:2", "--max-voters=3", "--rejoin"]
        );
        assert!(from("rejoin = false\n", &[]).unwrap().is_empty());
    }

    #[test]
    fn the_command_line_wins_over_the_file() {
        let args = from("max-voters = 3\n", &["--max-voters", "7"]).unwrap();
        assert!(args.is_empty(), "{args:?}");
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let err = from("# comment\nmax-voters = 3\nmax-votres = 4\n", &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 3"), "{text}");
        assert!(text.contains("\"max-votres\""), "{text}");
        assert!(text.contains("max-voters"), "{text}");
    }

    #[test]
    fn hidden_and_skipped_flags_are_not_keys() {
        assert!(matches!(
            from("weaken = \"skip-dedup\"\n", &[]),
            Err(ConfigFileError::UnknownKey { .. })
        ));
        assert!(matches!(
            from("config = \"x\"\n", &[]),
            Err(ConfigFileError::UnknownKey { .. })
        ));
    }

    #[test]
    fn a_bad_value_is_named_with_its_line_and_key() {
        let err = from("\nmax-voters = \"many\"\n", &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("\"max-voters\""), "{text}");
        assert!(text.contains("many"), "{text}");
        let err = from("rejoin = 3\n", &[]).unwrap_err();
        assert!(err.to_string().contains("true or false"), "{err}");
        let err = from("max-voters = { a = 1 }\n", &[]).unwrap_err();
        assert!(err.to_string().contains("table"), "{err}");
    }

    #[test]
    fn a_syntax_error_names_the_file() {
        let err = from("max-voters = \n", &[]).unwrap_err();
        assert!(matches!(err, ConfigFileError::Syntax { .. }), "{err}");
        assert!(err.to_string().contains("cellchat.toml"), "{err}");
    }
}
