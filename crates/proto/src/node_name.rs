//! Node names: what a node is called in tables, prompts and logs (`n1`, `eu-west-2`). The rule
//! is checked where a name is chosen (the node's data dir) and wherever one arrives from the
//! network (discovery), so no name can carry terminal control characters into a listing.

/// Longest node name, in bytes.
pub const NAME_LEN_MAX: usize = 32;

/// A node name that breaks the rules of [`validate_name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node name {name:?}: {reason}")]
pub struct NameError {
    /// The name as given.
    pub name: String,
    /// Which rule it breaks.
    pub reason: &'static str,
}

/// Checks a node name: 1 to [`NAME_LEN_MAX`] characters out of `a-z`, `0-9`, `-`, `_`, `.`.
///
/// Lowercase only, so two names that look the same in a table are the same name.
///
/// # Errors
/// [`NameError`] naming the value and the rule it breaks.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let error = |reason| {
        Err(NameError {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return error("a name has 1 to 32 characters, this one is empty");
    }
    if name.len() > NAME_LEN_MAX {
        return error("a name has 1 to 32 characters");
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    if !name.chars().all(allowed) {
        return error("use only a-z, 0-9, '-', '_' and '.'");
    }
    Ok(())
}
