//! The bytes a user signs to log in, shared by clients (which sign) and nodes (which verify).

/// Domain-separation prefix, so a login signature can never be replayed as any other
/// signature made with the same key.
const LOGIN_DOMAIN: &[u8] = b"cellchat-login-v2";

/// The message signed with the user's Ed25519 key for [`Chat::login`](crate::Chat::login): the
/// domain prefix, the connection's challenge, the TLS session's binding
/// ([`stream_binding`](crate::tls::stream_binding)), then the cluster name and the user name,
/// each length-prefixed (u32 little-endian) so that no two triples share an encoding. The
/// binding makes a signature useless on any other TLS session, so a relay that forwards a
/// challenge cannot log in with the answer.
pub fn login_message(
    challenge: &[u8; 32],
    binding: &[u8; 32],
    cluster: &str,
    name: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(LOGIN_DOMAIN.len() + 64 + 8 + cluster.len() + name.len());
    out.extend_from_slice(LOGIN_DOMAIN);
    out.extend_from_slice(challenge);
    out.extend_from_slice(binding);
    for part in [cluster, name] {
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out
}

/// Domain prefix of a web login's binding.
const WEB_BINDING_DOMAIN: &[u8] = b"cellchat-web-login-v1";

/// The binding a web login signs in place of the TLS session's: SHA-256 of a domain prefix and
/// the challenge. A browser cannot read its TLS session's exporter, so a web login is not bound
/// to its session; being no exporter value of any session, this binding keeps a web login's
/// signature from serving as a login on a chat or push connection.
pub fn web_binding(challenge: &[u8; 32]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(WEB_BINDING_DOMAIN);
    hash.update(challenge);
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_messages_differ_when_any_part_differs() {
        let (c, b) = ([7u8; 32], [9u8; 32]);
        let base = login_message(&c, &b, "cellchat", "alice");
        assert_ne!(base, login_message(&[8u8; 32], &b, "cellchat", "alice"));
        assert_ne!(base, login_message(&c, &[8u8; 32], "cellchat", "alice"));
        assert_ne!(base, login_message(&c, &b, "cellchat2", "alice"));
        assert_ne!(base, login_message(&c, &b, "cellchat", "alicf"));
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            login_message(&c, &b, "ab", "c"),
            login_message(&c, &b, "a", "bc")
        );
    }

    #[test]
    fn web_bindings_differ_by_challenge_and_from_the_challenge() {
        let a = web_binding(&[1u8; 32]);
        assert_ne!(a, web_binding(&[2u8; 32]));
        assert_ne!(a, [1u8; 32]);
        // The value crypto.js must also compute: SHA-256 of the prefix and 32 zero bytes.
        assert_eq!(
            hex_of(&web_binding(&[0u8; 32])),
            "a47b39127f149ff1dea5c44f8052109878aafa0b59d10f172493173ad60e552c"
        );
    }

    fn hex_of(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
