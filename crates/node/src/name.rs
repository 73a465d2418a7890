//! Node names: the short human handle an operator types and reads (`n1`, `eu-west-2`), checked
//! in one place.
//!
//! A name is chosen at a node's first start (`--name`, or a default derived from its data
//! dir), kept in the data dir, and carried in the cluster membership and in discovery
//! announcements. The numeric node id stays the identity Raft uses; the name is what tables,
//! prompts and log lines show.

use std::path::Path;

// The rule lives in proto, so discovery can refuse a bad name on receipt as well.
pub use proto::node_name::{validate_name, NameError, NAME_LEN_MAX};

/// The name a node gets when `--name` is not given at its first start: `nN` for a data dir
/// called `node-N` (what `DataDir::pick` makes, so a machine's nodes are `n1`, `n2`, ...),
/// else the dir's own name cleaned up to the name rules, else `n-` and six random hex digits.
pub fn default_name(dir: &Path) -> String {
    let base = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if let Some(n) = base.strip_prefix("node-") {
        if !n.is_empty() && n.len() < NAME_LEN_MAX && n.chars().all(|c| c.is_ascii_digit()) {
            return format!("n{n}");
        }
    }
    let cleaned: String = base
        .chars()
        .take(NAME_LEN_MAX)
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '_' | '.') => c,
            _ => '-',
        })
        .collect();
    let cleaned = cleaned.trim_matches(['-', '.']).to_owned();
    if validate_name(&cleaned).is_ok() {
        return cleaned;
    }
    format!("n-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("n1" ; "short")]
    #[test_case("eu-west.node_2" ; "all the punctuation")]
    #[test_case("0" ; "one digit")]
    #[test_case(&"a".repeat(32) ; "thirty two characters")]
    fn valid_names(name: &str) {
        assert_eq!(validate_name(name), Ok(()));
    }

    #[test_case("" ; "empty")]
    #[test_case(&"a".repeat(33) ; "thirty three characters")]
    #[test_case("N1" ; "uppercase")]
    #[test_case("n 1" ; "space")]
    #[test_case("n/1" ; "slash")]
    #[test_case("nö" ; "non ascii")]
    fn invalid_names_are_refused_with_the_value(name: &str) {
        let error = validate_name(name).unwrap_err();
        assert_eq!(error.name, name);
        assert!(error.to_string().contains(&format!("{name:?}")), "{error}");
    }

    #[test_case("data/node-1", "n1" ; "picked dir")]
    #[test_case("/tmp/x/node-12", "n12" ; "picked dir two digits")]
    #[test_case("/srv/Cell Chat", "cell-chat" ; "explicit dir cleaned")]
    #[test_case("/srv/node-x", "node-x" ; "node prefix without a number")]
    fn default_names(dir: &str, expected: &str) {
        assert_eq!(default_name(Path::new(dir)), expected);
    }

    #[test]
    fn a_dir_without_a_usable_name_gets_a_random_valid_one() {
        let name = default_name(Path::new("/"));
        assert!(name.starts_with("n-"), "{name}");
        assert_eq!(validate_name(&name), Ok(()));
        let long = default_name(Path::new(&"x".repeat(40)));
        assert_eq!(long, "x".repeat(32));
    }
}
