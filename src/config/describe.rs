//! Turns figment's errors into lines a user can act on: the key (once), the
//! file or the real environment variable it came from, what is wrong in plain
//! words, and for a misspelled key the key that was probably meant.

use super::{ConfigError, ENV_PREFIX};
use figment::error::{Actual, Kind};
use figment::{Metadata, Source};

/// Where a value came from: the file's path, or the environment variable
/// exactly as it is spelled in the environment (figment only knows the key).
pub(super) fn source_of(meta: &Metadata, key: &str) -> String {
    match &meta.source {
        Some(Source::File(path)) => path.display().to_string(),
        _ if meta.name.contains("environment") => variable_for(key),
        _ => meta.name.to_string(),
    }
}

/// The variable(s) that set `key`. Prefix and names match case-insensitively
/// (as figment reads them); a key may also have been set through a deeper
/// variable (`ROOMHUB_SERVER__BIND__X` makes `server.bind` a table).
fn variable_for(key: &str) -> String {
    let wanted = format!("{ENV_PREFIX}{}", key.replace('.', "__")).to_ascii_uppercase();
    let deeper = format!("{wanted}__");
    let mut names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| {
            let upper = name.trim().to_ascii_uppercase();
            // Only setting variables (with `__`) can have set a key.
            let is_setting = upper
                .strip_prefix(ENV_PREFIX)
                .is_some_and(|rest| rest.contains("__"));
            is_setting && (upper == wanted || upper.starts_with(&deeper))
        })
        .collect();
    names.sort();
    if names.is_empty() {
        wanted
    } else {
        names.join(", ")
    }
}

pub(super) fn describe_figment_error(error: figment::Error) -> ConfigError {
    let lines: Vec<String> = error.into_iter().map(describe_one).collect();
    ConfigError::Invalid(lines.join("\n"))
}

fn describe_one(e: figment::Error) -> String {
    let mut path = e.path.clone();
    if let Kind::UnknownField(field, _) = &e.kind {
        // figment's path usually ends with the unknown field already.
        if path.last() != Some(field) {
            path.push(field.clone());
        }
    }
    let key = path.join(".");
    let source = e.metadata.as_ref().map(|m| source_of(m, &key));
    let what = match &e.kind {
        Kind::UnknownField(field, known) => {
            let section = &path[..path.len() - 1];
            format!("unknown key{}", suggestion(section, field, known))
        }
        Kind::UnknownVariant(found, known) => {
            format!("`{found}` is not one of {}", quoted(known))
        }
        Kind::InvalidType(actual, expected) => {
            format!("expected {expected}, found {}", plain(actual))
        }
        other => other.to_string(),
    };
    match (key.is_empty(), source) {
        // A file that is not valid TOML has no key to name: name the file.
        (true, Some(source)) => format!("{source}: {what}"),
        (true, None) => what,
        (false, Some(source)) => format!("{key} (from {source}): {what}"),
        (false, None) => format!("{key}: {what}"),
    }
}

/// `actual` without figment's backticks (they nest badly in our messages).
fn plain(actual: &Actual) -> String {
    actual.to_string().replace('`', "")
}

fn quoted(names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    names.join(", ")
}

/// "; did you mean `section.key`?" for a near miss, else the keys there are.
fn suggestion(section: &[String], field: &str, known: &[&str]) -> String {
    let full = |name: &str| {
        let mut parts = section.to_vec();
        parts.push(name.to_owned());
        parts.join(".")
    };
    let nearest = known
        .iter()
        .map(|name| (edit_distance(&field.to_ascii_lowercase(), name), *name))
        .min();
    match nearest {
        Some((distance, name)) if distance <= (name.len() / 3).max(2) => {
            format!("; did you mean `{}`?", full(name))
        }
        _ if known.is_empty() => String::new(),
        _ => {
            let names: Vec<String> = known.iter().map(|n| full(n)).collect();
            format!("; the keys here are {}", quoted_owned(&names))
        }
    }
}

fn quoted_owned(names: &[String]) -> String {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    quoted(&names)
}

/// Levenshtein distance: keys are short, so the plain two-row version will do.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_nearest_key_only_when_near() {
        let section = ["server".to_owned()];
        let known = ["bind", "node_id", "shutdown_grace_ms"];
        assert_eq!(
            suggestion(&section, "bnid", &known),
            "; did you mean `server.bind`?"
        );
        assert_eq!(
            suggestion(&section, "shutdown_grace", &known),
            "; did you mean `server.shutdown_grace_ms`?"
        );
        assert!(suggestion(&section, "colour", &known).contains("`server.node_id`"));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
