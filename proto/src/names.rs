//! Validation of site, collection and key names, with the limits SPEC.md sets.

use thiserror::Error;

/// Longest site name: `[a-z0-9][a-z0-9-]{0,62}`.
pub const SITE_NAME_BYTES_MAX: usize = 63;
/// Longest collection name: `[A-Za-z0-9_.-]{1,64}`.
pub const COLLECTION_NAME_BYTES_MAX: usize = 64;
/// Longest key, in UTF-8 bytes.
pub const KEY_BYTES_MAX: usize = 512;

/// Why a name was refused. The message names the rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("invalid site name {0:?}: must match [a-z0-9][a-z0-9-]{{0,62}}")]
    Site(String),
    #[error("invalid collection name {0:?}: must match [A-Za-z0-9_.-]{{1,64}}")]
    Collection(String),
    #[error("collection {0:?} is reserved: names starting with '_' are for templates, routes and assets (_templates, _routes, _assets)")]
    ReservedCollection(String),
    #[error("invalid key: {0}")]
    Key(String),
}

/// Checks a site name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_site(name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if first_ok && rest_ok && bytes.len() <= SITE_NAME_BYTES_MAX {
        Ok(())
    } else {
        Err(NameError::Site(truncate_for_message(name)))
    }
}

/// Collections a site may write that start with `_`: they describe the site's pages,
/// `_receipts` holds mailbox delivery receipts and `_live` what visitors may do live (see
/// `sync`).
pub const SYSTEM_COLLECTIONS: [&str; 5] =
    ["_templates", "_routes", "_assets", "_receipts", "_live"];

/// Checks a collection name: `[A-Za-z0-9_.-]{1,64}`; names starting with `_` are reserved
/// except the page-describing collections in [`SYSTEM_COLLECTIONS`].
pub fn validate_collection(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= COLLECTION_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        return Err(NameError::Collection(truncate_for_message(name)));
    }
    if name.starts_with('_') && !SYSTEM_COLLECTIONS.contains(&name) {
        return Err(NameError::ReservedCollection(name.to_string()));
    }
    Ok(())
}

/// Checks a key: non-empty UTF-8 (guaranteed by `&str`), at most [`KEY_BYTES_MAX`] bytes, no
/// control characters (they make URLs, logs and terminals lie).
pub fn validate_key(key: &str) -> Result<(), NameError> {
    if key.is_empty() {
        return Err(NameError::Key("key is empty".into()));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(NameError::Key(format!(
            "key is {} bytes, the limit is {KEY_BYTES_MAX} bytes",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(NameError::Key(format!(
            "key {:?} contains a control character",
            truncate_for_message(key)
        )));
    }
    Ok(())
}

/// Whether a byte may stand in a URL path segment as it is (RFC 3986 "unreserved"). Every
/// other byte is percent-encoded.
pub fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Percent-encodes a string (a site, collection or key) for use as one URL path segment or
/// query value, with upper-case hex. Only unreserved bytes stay as they are: `/` in a key
/// must not split the segment, and `+`, `;` or `&` are read differently by different servers
/// and caches. Pages and API clients both spell URLs this way.
pub fn encode_segment(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if is_unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
    out
}

fn truncate_for_message(s: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 80;
    if s.chars().count() <= SHOWN_CHARS_MAX {
        s.to_string()
    } else {
        let head: String = s.chars().take(SHOWN_CHARS_MAX).collect();
        format!("{head}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names() {
        for ok in ["demo", "a", "0", "my-site-2", &"a".repeat(63)] {
            assert_eq!(validate_site(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-a", "Demo", "a_b", "a.b", "a/b", &"a".repeat(64), "é"] {
            assert!(validate_site(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn collection_names() {
        for ok in [
            "profiles",
            "A.b-c_d",
            "_templates",
            "_routes",
            "_assets",
            &"x".repeat(64),
        ] {
            assert_eq!(validate_collection(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/b", "a b", &"x".repeat(65), "ü"] {
            assert!(
                matches!(validate_collection(bad), Err(NameError::Collection(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            validate_collection("_secret"),
            Err(NameError::ReservedCollection(_))
        ));
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("a/b c?é"), "a%2Fb%20c%3F%C3%A9");
        assert_eq!(encode_segment("plain-key_1.x~"), "plain-key_1.x~");
    }

    #[test]
    fn keys() {
        assert_eq!(validate_key("alice"), Ok(()));
        assert_eq!(validate_key("css/site.css"), Ok(()));
        assert_eq!(validate_key(&"k".repeat(512)), Ok(()));
        assert_eq!(validate_key("ünïcødé ✓"), Ok(()));
        assert!(validate_key("").is_err());
        assert!(validate_key(&"k".repeat(513)).is_err());
        assert!(validate_key("a\nb").is_err());
        let long = validate_key(&"k".repeat(600)).unwrap_err().to_string();
        assert!(long.contains("512"), "{long}");
    }
}
