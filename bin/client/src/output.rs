//! How messages and servers are printed: human lines and JSON lines.

use cellchat_client::crypto::{Author, Content};
use cellchat_client::{Relation, ServerInfo, Shown, WireMessage};
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
    /// Whether the sender's signature verified under the key pinned for the sender.
    pub verified: bool,
    /// What a reader should know before trusting it: `[forged?]`, `[replayed]`,
    /// `[unverified]`, `[unsigned]`, `[plaintext]`, `[key changed!]`.
    pub markers: Vec<&'static str>,
    /// The sender's client seq.
    pub client_seq: u64,
    /// What it does to an earlier message, if it is a reply, edit, delete or reaction.
    pub relation: Option<&'a Relation>,
    /// Its body was erased by a delete.
    pub deleted: bool,
    /// How often it was edited; `text` is then the newest edit's.
    pub edits: u32,
    /// How many replies answer it.
    pub replies: u64,
    /// Its reactions, by emoji, with who reacted.
    pub reactions: &'a [cellchat_client::Reaction],
}

/// What a continuation line of a multi-line message starts with: every line a message
/// prints after its first is indented, so no message can draw a line that looks like
/// another message or a notice from the client.
pub const CONTINUATION: &str = "    ";

/// Whether `c` could change what the terminal shows beyond one visible character: control
/// characters (C0, DEL, C1: cursor moves, colors, titles), invisible format characters that
/// reorder or hide text (bidi overrides and isolates, zero-width spaces and joiners, word
/// joiners, the byte order mark, tags), and the line and paragraph separators.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{034f}'
                | '\u{061c}'
                | '\u{115f}'
                | '\u{1160}'
                | '\u{17b4}'
                | '\u{17b5}'
                | '\u{180b}'..='\u{180f}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{3164}'
                | '\u{fe00}'..='\u{fe0f}'
                | '\u{feff}'
                | '\u{ffa0}'
                | '\u{fff0}'..='\u{fffb}'
                | '\u{1d173}'..='\u{1d17a}'
                | '\u{e0000}'..='\u{e0fff}'
        )
}

/// One line of text from a server (a name, an error, a message line) made safe to print:
/// every [unsafe](is_unsafe) character, newlines included, becomes U+FFFD.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if is_unsafe(c) { '\u{fffd}' } else { c })
        .collect()
}

/// A message body made safe to print: each of its lines [sanitized](sanitize), the lines after
/// the first indented by [`CONTINUATION`]. `\r\n` counts as one line break.
pub fn sanitize_body(text: &str) -> String {
    sanitize_lines(text).replace('\n', &format!("\n{CONTINUATION}"))
}

/// `[5s ago] #12 Bob: Hey Alice!`, with what a reader should know first:
/// `[5s ago] #13 Bob: [forged?] pay me`, and what it is or what happened to it:
/// `[reply to #12] sure`, `Hey Alice! (edited) [👍 2]`, `[reacted 👍 to #12]`.
pub fn line(shown: &Shown, message: &WireMessage, now_ms: u64) -> String {
    format!(
        "[{}] #{} {}: {}",
        timefmt::relative(now_ms, message.at_ms),
        message.seq,
        sanitize(&message.sender),
        sanitize_body(&describe(shown, message))
    )
}

/// A message's text with its markers, framed by what it is (a reply, edit, delete or
/// reaction) and followed by what happened to it (edited, reactions, replies). Not
/// sanitized.
pub fn describe(shown: &Shown, message: &WireMessage) -> String {
    let markers = markers(shown).join(" ");
    let with_markers = |action: String| {
        if markers.is_empty() {
            action
        } else {
            format!("{markers} {action}")
        }
    };
    let text = if message.deleted {
        "[deleted]".to_owned()
    } else {
        shown.display()
    };
    let mut out = match &message.relation {
        Some(Relation::Reply { to }) => format!("[reply to #{to}] {text}"),
        Some(Relation::Edit { of }) => format!("[edit of #{of}] {text}"),
        Some(Relation::Delete { of }) => return with_markers(format!("[deleted #{of}]")),
        Some(Relation::React { to, emoji, on }) => {
            let action = if *on {
                format!("[reacted {emoji} to #{to}]")
            } else {
                format!("[took back {emoji} from #{to}]")
            };
            return with_markers(action);
        }
        None => text,
    };
    out.push_str(&annotations(message));
    out
}

/// ` (edited) [👍 2, 🎉 1] [3 replies]`: what happened to a message, or nothing.
pub fn annotations(message: &WireMessage) -> String {
    let reactions = message
        .reactions
        .iter()
        .map(|r| (r.emoji.as_str(), r.users.len()));
    annotation_text(
        message.edits > 0 && !message.deleted,
        reactions,
        message.replies,
    )
}

/// Who types, as a status line says it: `bob is typing…`, `bob and carol are typing…`,
/// `bob, carol and 2 others are typing…`; empty for nobody. Names sanitized.
pub fn typing_text(users: &[String]) -> String {
    let names: Vec<String> = users.iter().map(|u| sanitize(u)).collect();
    match names.as_slice() {
        [] => String::new(),
        [one] => format!("{one} is typing…"),
        [a, b] => format!("{a} and {b} are typing…"),
        [a, b, other] => format!("{a}, {b} and {other} are typing…"),
        [a, b, rest @ ..] => format!("{a}, {b} and {} others are typing…", rest.len()),
    }
}

/// What [`annotations`] says, from its parts (the full-screen chat keeps them in its own
/// model); emoji sanitized.
pub fn annotation_text<'a>(
    edited: bool,
    reactions: impl Iterator<Item = (&'a str, usize)>,
    replies: u64,
) -> String {
    let mut out = String::new();
    if edited {
        out.push_str(" (edited)");
    }
    let counts: Vec<String> = reactions
        .map(|(emoji, count)| format!("{} {count}", sanitize(emoji)))
        .collect();
    if !counts.is_empty() {
        out.push_str(&format!(" [{}]", counts.join(", ")));
    }
    match replies {
        0 => {}
        1 => out.push_str(" [1 reply]"),
        n => out.push_str(&format!(" [{n} replies]")),
    }
    out
}

/// What a reader should know before trusting a message, most serious first.
pub fn markers(shown: &Shown) -> Vec<&'static str> {
    let mut markers: Vec<&'static str> = shown
        .opened
        .markers(shown.history, shown.seen)
        .into_iter()
        .map(|m| m.as_str())
        .collect();
    if matches!(shown.key, cellchat_client::SenderKey::Changed { .. }) {
        markers.insert(0, "[key changed!]");
    }
    markers
}

/// A message body made safe to draw line by line: each line [sanitized](sanitize), the
/// line breaks kept (`\r\n` counts as one) for the screen to indent.
pub fn sanitize_lines(text: &str) -> String {
    let lines: Vec<String> = text
        .split('\n')
        .map(|line| sanitize(line.strip_suffix('\r').unwrap_or(line)))
        .collect();
    lines.join("\n")
}

/// The message as one JSON line.
pub fn json(shown: &Shown, message: &WireMessage) -> String {
    let content = shown.opened.content();
    let text = content.display();
    let markers = markers(shown);
    let value = MessageJson {
        channel: &message.channel,
        seq: message.seq,
        sender: &message.sender,
        text: &text,
        at_ms: message.at_ms,
        encrypted: shown.opened.is_encrypted(),
        readable: matches!(content, Content::Clear(_)),
        verified: shown.opened.author() == Author::Verified,
        markers,
        client_seq: message.client_seq,
        relation: message.relation.as_ref(),
        deleted: message.deleted,
        edits: message.edits,
        replies: message.replies,
        reactions: &message.reactions,
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
                sanitize(&s.name)
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

    use cellchat_client::crypto::{self, ChannelHistory, Keys, Seen};
    use cellchat_client::SenderKey;

    /// What a reader without keys shows of `m` (v1 plaintext: unsigned).
    fn shown(m: &WireMessage) -> Shown {
        Shown {
            opened: crypto::open_message(
                &Keys::default(),
                "c1",
                &m.channel,
                &m.sender,
                m.client_seq,
                None,
                &m.body,
            ),
            seen: Seen::Untracked,
            history: ChannelHistory::Plain,
            key: SenderKey::Unknown,
        }
    }

    fn line(m: &WireMessage, now_ms: u64) -> String {
        super::line(&shown(m), m, now_ms)
    }

    fn message(body: Vec<u8>) -> WireMessage {
        WireMessage {
            channel: "general".into(),
            seq: 3,
            sender: "Bob".into(),
            body,
            at_ms: 1_000,
            client_seq: 9,
            ..WireMessage::default()
        }
    }

    #[test]
    fn a_line_has_time_sender_and_text() {
        let m = message(crypto::plain_body("Hey Alice!"));
        assert_eq!(line(&m, 2_500), "[1s ago] #3 Bob: [unsigned] Hey Alice!");
        assert_eq!(line(&m, 1_200), "[now] #3 Bob: [unsigned] Hey Alice!");
    }

    #[test]
    fn control_characters_are_neutralized() {
        let m = message(crypto::plain_body("\u{1b}[2Jgotcha"));
        assert_eq!(
            line(&m, 1_000),
            "[now] #3 Bob: [unsigned] \u{fffd}[2Jgotcha"
        );
    }

    #[test]
    fn bidi_zero_width_and_separators_are_neutralized() {
        for hostile in [
            "\u{202e}txt.exe",
            "a\u{200b}b",
            "x\u{2028}y",
            "\u{2066}i\u{2069}",
            "\u{feff}z",
        ] {
            let shown = sanitize(hostile);
            assert!(shown.contains('\u{fffd}'), "{hostile:?} -> {shown:?}");
            assert!(!leaks(&shown));
        }
        assert_eq!(sanitize("plain text, ünïcode ✓"), "plain text, ünïcode ✓");
    }

    #[test]
    fn a_multi_line_message_cannot_draw_a_line_of_its_own() {
        let m = message(crypto::plain_body(
            "hi\n[now] Alice: send me your key\r\nbye",
        ));
        assert_eq!(
            line(&m, 1_000),
            "[now] #3 Bob: [unsigned] hi\n    [now] Alice: send me your key\n    bye"
        );
    }

    /// Whether `shown` holds an unsafe character other than the replacement one.
    fn leaks(shown: &str) -> bool {
        shown.chars().any(|c| c != '\u{fffd}' && is_unsafe(c))
    }

    proptest::proptest! {
        #[test]
        fn sanitized_text_holds_nothing_unsafe(text in proptest::prelude::any::<String>()) {
            let line = sanitize(&text);
            proptest::prop_assert!(!leaks(&line));
            proptest::prop_assert_eq!(line.chars().count(), text.chars().count());
            let body = sanitize_body(&text);
            for (i, shown) in body.split('\n').enumerate() {
                proptest::prop_assert!(!leaks(shown));
                proptest::prop_assert!(i == 0 || shown.starts_with(CONTINUATION));
            }
        }

        #[test]
        fn safe_text_is_shown_as_it_is(text in "[ -~\u{a0}-\u{ac}\u{ae}-\u{2ff}]{0,80}") {
            proptest::prop_assert_eq!(sanitize(&text), text.clone());
            proptest::prop_assert_eq!(sanitize_body(&text), text);
        }
    }

    #[test]
    fn json_lines_carry_the_required_fields() {
        let m = message(crypto::plain_body("hi"));
        let v: serde_json::Value = serde_json::from_str(&json(&shown(&m), &m)).expect("json");
        assert_eq!(v["channel"], "general");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["sender"], "Bob");
        assert_eq!(v["text"], "hi");
        assert_eq!(v["at_ms"], 1_000);
        assert_eq!(v["encrypted"], false);
        assert_eq!(v["verified"], false);
        assert_eq!(v["markers"][0], "[unsigned]");
    }

    #[test]
    fn encrypted_without_key_is_a_placeholder() {
        let m = message(vec![crypto::FORMAT_AES_GCM_V1, 1, 2, 3]);
        assert_eq!(line(&m, 1_000), "[now] #3 Bob: [encrypted]");
    }
}
