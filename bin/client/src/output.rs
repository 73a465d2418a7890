//! How messages and servers are printed: human lines and JSON lines.

use cellchat_client::crypto::{self, ChannelKey, Text};
use cellchat_client::{ServerInfo, WireMessage};
use serde::Serialize;

use crate::timefmt;

/// One message as a JSON line (`--json`).
#[derive(Debug, Serialize)]
pub struct MessageJson<'a> {
    /// Channel name.
    pub channel: &'a str,
    /// Per-channel seq.
    pub seq: u64,
    /// The name the server stamped.
    pub sender: &'a str,
    /// The text, or a placeholder such as `[encrypted]`.
    pub text: &'a str,
    /// Server timestamp, ms since the Unix epoch.
    pub at_ms: u64,
    /// Whether the body was encrypted.
    pub encrypted: bool,
    /// Whether `text` is the real text (plaintext, or decrypted).
    pub readable: bool,
    /// The sender's client seq.
    pub client_seq: u64,
}

/// What a reader sees of `message` with `key`.
pub fn text(key: Option<&ChannelKey>, message: &WireMessage) -> Text {
    crypto::open_body(
        key,
        &message.channel,
        &message.sender,
        message.client_seq,
        &message.body,
    )
}

/// Replaces control characters so a message cannot move the cursor or recolor the terminal.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// `[5s ago] Bob: Hey Alice!`
pub fn line(key: Option<&ChannelKey>, message: &WireMessage, now_ms: u64) -> String {
    format!(
        "[{}] {}: {}",
        timefmt::relative(now_ms, message.at_ms),
        sanitize(&message.sender),
        sanitize(text(key, message).display())
    )
}

/// The message as one JSON line.
pub fn json(key: Option<&ChannelKey>, message: &WireMessage) -> String {
    let text = text(key, message);
    let value = MessageJson {
        channel: &message.channel,
        seq: message.seq,
        sender: &message.sender,
        text: text.display(),
        at_ms: message.at_ms,
        encrypted: message.body.first() == Some(&crypto::FORMAT_AES_GCM_V1),
        readable: matches!(text, Text::Clear(_)),
        client_seq: message.client_seq,
    };
    serde_json::to_string(&value).expect("a message always serializes")
}

/// A table of servers, one per line, the node read from marked with `*`.
pub fn servers_table(servers: &[ServerInfo]) -> String {
    let mut out = format!(
        "  {:<20} {:<10} {:<22} {:>9} {:>10}\n",
        "node", "role", "address", "rtt", "applied"
    );
    for s in servers {
        let rtt = s.rtt_ms.map_or_else(
            || if s.down { "down".into() } else { "-".into() },
            |r| format!("{r:.2}ms"),
        );
        out.push_str(&format!(
            "{} {:<20} {:<10} {:<22} {:>9} {:>10}\n",
            if s.reading { '*' } else { ' ' },
            // By name; by id only until the node's announcement has been heard.
            if s.name.is_empty() {
                s.id.to_string()
            } else {
                s.name.clone()
            },
            s.role,
            s.client_addr.to_string(),
            rtt,
            s.applied
        ));
    }
    out.push_str("(* = the node you read from)");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: Vec<u8>) -> WireMessage {
        WireMessage {
            channel: "general".into(),
            seq: 3,
            sender: "Bob".into(),
            body,
            at_ms: 1_000,
            client_id: [0; 16],
            client_seq: 9,
        }
    }

    #[test]
    fn a_line_has_time_sender_and_text() {
        let m = message(crypto::plain_body("Hey Alice!"));
        assert_eq!(line(None, &m, 2_500), "[1s ago] Bob: Hey Alice!");
        assert_eq!(line(None, &m, 1_200), "[now] Bob: Hey Alice!");
    }

    #[test]
    fn control_characters_are_neutralized() {
        let m = message(crypto::plain_body("\u{1b}[2Jgotcha"));
        assert_eq!(line(None, &m, 1_000), "[now] Bob: \u{fffd}[2Jgotcha");
    }

    #[test]
    fn json_lines_carry_the_required_fields() {
        let m = message(crypto::plain_body("hi"));
        let v: serde_json::Value = serde_json::from_str(&json(None, &m)).expect("json");
        assert_eq!(v["channel"], "general");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["sender"], "Bob");
        assert_eq!(v["text"], "hi");
        assert_eq!(v["at_ms"], 1_000);
        assert_eq!(v["encrypted"], false);
    }

    #[test]
    fn encrypted_without_key_is_a_placeholder() {
        let m = message(vec![crypto::FORMAT_AES_GCM_V1, 1, 2, 3]);
        assert_eq!(line(None, &m, 1_000), "[now] Bob: [encrypted]");
    }
}
