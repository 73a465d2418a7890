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
}
