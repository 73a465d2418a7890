//! The full-screen client's state, without a terminal: channels with their scrollback, unread
//! and mention counts, the input line with its history and completion, and what Ctrl-C means.
//! Everything here is a plain function of the events it is given, so it is tested without a
//! screen; `view.rs` draws it.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use crate::typing::TypingBoard;

/// Lines of scrollback kept per channel in memory; older ones are paged in again from the
/// servers when scrolled to.
pub const SCROLLBACK_MAX: usize = 10_000;
/// A second Ctrl-C within this many ms of the first quits; otherwise Ctrl-C clears the line.
pub const QUIT_WINDOW_MS: u64 = 2_000;
/// Input history entries kept (and saved).
pub const HISTORY_MAX: usize = 1_000;

/// One line of a channel's scrollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A chat message.
    Message(Shown),
    /// Something the client says (a join, an error, a notice), at a local time.
    Notice {
        /// When, ms since the epoch.
        at_ms: u64,
        /// The text, already sanitized.
        text: String,
    },
}

impl Line {
    /// When it was said, ms since the epoch.
    pub fn at_ms(&self) -> u64 {
        match self {
            Line::Message(m) => m.at_ms,
            Line::Notice { at_ms, .. } => *at_ms,
        }
    }
}

/// A message as the screen shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shown {
    /// Its per-channel seq.
    pub seq: u64,
    /// The sender's name, sanitized.
    pub sender: String,
    /// The text (sanitized; may hold newlines, drawn as continuation lines).
    pub text: String,
    /// The leader's timestamp, ms since the epoch.
    pub at_ms: u64,
    /// What a reader should know first (`[forged?]`, `[encrypted]`, ...).
    pub markers: Vec<String>,
    /// Whether it concerns this user as a mention does: it names them (`@name`), or it
    /// replies in a thread they are in (to their message, or to one they replied to).
    pub mentions_me: bool,
    /// What it does to an earlier message, if it is a reply, edit, delete or reaction. Only
    /// replies are drawn; the others change the line of their target.
    pub relation: Option<proto::Relation>,
    /// Its text is its newest edit's.
    pub edited: bool,
    /// Its text was erased by a delete.
    pub deleted: bool,
    /// Its reactions: emoji and who reacted, as the nodes sent them (drawn sanitized).
    pub reactions: Vec<(String, Vec<String>)>,
    /// How many replies answer it, as of when it was read.
    pub replies: u64,
}

impl Shown {
    /// Whether it is an edit, delete or reaction: folded into its target, not drawn.
    pub fn is_folded(&self) -> bool {
        matches!(
            self.relation,
            Some(
                proto::Relation::Edit { .. }
                    | proto::Relation::Delete { .. }
                    | proto::Relation::React { .. }
            )
        )
    }

    /// Applies this edit, delete or reaction to `target`, the message it names. An edit by
    /// anyone but the target's sender is ignored (the nodes refuse it; only a lying node
    /// would send one).
    fn fold_into(&self, target: &mut Shown) {
        match &self.relation {
            Some(proto::Relation::Edit { .. }) => {
                if target.sender == self.sender && !target.deleted {
                    target.text = self.text.clone();
                    target.markers = self.markers.clone();
                    target.edited = true;
                }
            }
            Some(proto::Relation::Delete { .. }) => {
                target.text = "[deleted]".to_owned();
                target.markers.clear();
                target.deleted = true;
                target.reactions.clear();
                target.mentions_me = false;
            }
            Some(proto::Relation::React { emoji, on, .. }) => {
                let at = target.reactions.iter().position(|(e, _)| e == emoji);
                match (at, *on) {
                    (Some(at), true) => {
                        let users = &mut target.reactions[at].1;
                        if !users.contains(&self.sender) {
                            users.push(self.sender.clone());
                        }
                    }
                    (None, true) => {
                        target
                            .reactions
                            .push((emoji.clone(), vec![self.sender.clone()]));
                        target.reactions.sort();
                    }
                    (Some(at), false) => {
                        target.reactions[at].1.retain(|u| *u != self.sender);
                        if target.reactions[at].1.is_empty() {
                            target.reactions.remove(at);
                        }
                    }
                    (None, false) => {}
                }
            }
            Some(proto::Relation::Reply { .. }) | None => {}
        }
    }
}

/// One channel's view.
#[derive(Debug, Default, Clone)]
pub struct Channel {
    /// Scrollback, oldest first.
    pub lines: VecDeque<Line>,
    /// Messages that arrived while another channel was shown.
    pub unread: u32,
    /// Of those, the ones that mention this user.
    pub mentions: u32,
    /// More messages after the read marker than the ones held (counted): older unread
    /// messages were never read from the servers. Drawn as `N+`.
    pub unread_more: bool,
    /// Lines scrolled up from the bottom (0: following new messages).
    pub scroll: usize,
    /// The oldest seq held, where paging back continues.
    pub oldest_seq: Option<u64>,
    /// Whether the servers have nothing older (paged back to seq 1, or to the floor).
    pub at_start: bool,
    /// Muted: new messages and mentions are counted but never ring the bell.
    pub muted: bool,
    /// The newest seq delivered live (drawn or folded into its target); anything at or
    /// below it is a repeat.
    pub newest: u64,
    /// This user's read marker: the highest seq read here, on this client or another.
    pub read_to: u64,
    /// Where the "new since you last read" line goes: after this seq. Set when the channel is
    /// opened with unread messages (or its history first arrives shown), kept until it is
    /// opened again.
    pub divider: Option<u64>,
    /// Whether its first page of history arrived.
    pub loaded: bool,
}

impl Channel {
    /// Counts as unread the messages held after the read marker that are not `me`'s, and of
    /// them the mentions. Only held messages count: at most the scrollback.
    fn count_unread(&mut self, me: &str) {
        let (mut unread, mut mentions) = (0, 0);
        for line in &self.lines {
            if let Line::Message(m) = line {
                if m.seq > self.read_to && m.sender != me {
                    unread += 1;
                    mentions += u32::from(m.mentions_me);
                }
            }
        }
        (self.unread, self.mentions) = (unread, mentions);
        // The oldest message held is past the one after the marker, and the servers have
        // older ones: some unread messages are not held.
        let oldest = self.lines.iter().find_map(|l| match l {
            Line::Message(m) => Some(m.seq),
            Line::Notice { .. } => None,
        });
        self.unread_more =
            !self.at_start && oldest.is_some_and(|oldest| oldest > self.read_to.saturating_add(1));
    }

    /// Drops the oldest lines past [`SCROLLBACK_MAX`], only while following new messages:
    /// lines paged in to be read stay until End.
    fn trim(&mut self) {
        if self.scroll > 0 || self.lines.len() <= SCROLLBACK_MAX {
            return;
        }
        while self.lines.len() > SCROLLBACK_MAX {
            self.lines.pop_front();
        }
        self.at_start = false;
        self.oldest_seq = self.lines.iter().find_map(|l| match l {
            Line::Message(m) => Some(m.seq),
            Line::Notice { .. } => None,
        });
    }
}

/// What a key press asks the caller to do, beyond redrawing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing more.
    None,
    /// Send or run this input line (it was entered).
    Submit(String),
    /// The secret asked for was entered (never kept in the input history).
    Secret(String),
    /// Fetch older history of the current channel: the page before this seq.
    PageBack {
        /// The channel.
        channel: String,
        /// The oldest seq shown.
        before: u64,
    },
    /// Ring the terminal bell.
    Bell,
    /// Quit.
    Quit,
}

/// The input line: text, cursor (in chars), history.
#[derive(Debug, Default, Clone)]
pub struct Input {
    /// What is typed.
    pub text: String,
    /// Cursor position, in chars.
    pub cursor: usize,
    /// Earlier lines, oldest first (never `/key` lines).
    pub history: Vec<String>,
    /// Where Up/Down is in `history` (`None`: editing a new line).
    browsing: Option<usize>,
    /// The new line kept while browsing history.
    draft: String,
    /// The completion being cycled: (the word typed, candidates, next index).
    completing: Option<(String, Vec<String>, usize)>,
}

impl Input {
    fn byte_at(&self, chars: usize) -> usize {
        self.text
            .char_indices()
            .nth(chars)
            .map_or(self.text.len(), |(i, _)| i)
    }

    /// Inserts `text` at the cursor. A paste arrives as one call, so it shows at once; its
    /// line breaks stay in the text (a multi-line message).
    pub fn insert(&mut self, text: &str) {
        self.completing = None;
        let at = self.byte_at(self.cursor);
        self.text.insert_str(at, text);
        self.cursor += text.chars().count();
    }

    /// Text arriving in one piece (a bracketed paste): inserted at once, with control
    /// characters other than line breaks and tabs shown as U+FFFD. Returns whether it ended
    /// in a line break (not inserted), which the caller treats as Enter, as the same keys
    /// typed would be.
    pub fn paste(&mut self, text: &str) -> bool {
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        let (body, enter) = match text.strip_suffix('\n') {
            Some(body) => (body, true),
            None => (text.as_str(), false),
        };
        let clean: String = body
            .chars()
            .map(|c| match c {
                '\n' => '\n',
                '\t' => ' ',
                c if crate::output::is_unsafe(c) => '\u{fffd}',
                c => c,
            })
            .collect();
        self.insert(&clean);
        enter
    }

    /// The editing keys both modes share: typing, Backspace, Delete, Left, Right, Ctrl-A,
    /// Ctrl-E, Ctrl-U, Ctrl-W, and Alt-Enter or Shift-Enter for a line break. Returns whether
    /// the key was one of them; other Ctrl keys are taken and ignored.
    pub fn edit(&mut self, key: &crossterm::event::KeyEvent) -> bool {
        use crossterm::event::{KeyCode, KeyModifiers};
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let newline = key
            .modifiers
            .intersects(KeyModifiers::ALT | KeyModifiers::SHIFT);
        match key.code {
            KeyCode::Char('a') if ctrl => self.home_end(false),
            KeyCode::Char('e') if ctrl => self.home_end(true),
            KeyCode::Char('u') if ctrl => self.clear(),
            KeyCode::Char('w') if ctrl => self.delete_word(),
            KeyCode::Char(_) if ctrl => {}
            KeyCode::Char(c) => self.insert(c.encode_utf8(&mut [0; 4])),
            KeyCode::Enter if newline => self.insert("\n"),
            KeyCode::Backspace => self.backspace(),
            KeyCode::Delete => self.delete(),
            KeyCode::Left => self.move_cursor(-1),
            KeyCode::Right => self.move_cursor(1),
            _ => return false,
        }
        true
    }

    /// Deletes the char before the cursor.
    pub fn backspace(&mut self) {
        self.completing = None;
        if self.cursor == 0 {
            return;
        }
        let (from, to) = (self.byte_at(self.cursor - 1), self.byte_at(self.cursor));
        self.text.replace_range(from..to, "");
        self.cursor -= 1;
    }

    /// Deletes the word before the cursor (and the spaces after it).
    pub fn delete_word(&mut self) {
        self.completing = None;
        let chars: Vec<char> = self.text.chars().collect();
        let mut from = self.cursor.min(chars.len());
        while from > 0 && chars[from - 1].is_whitespace() {
            from -= 1;
        }
        while from > 0 && !chars[from - 1].is_whitespace() {
            from -= 1;
        }
        let (start, end) = (self.byte_at(from), self.byte_at(self.cursor));
        self.text.replace_range(start..end, "");
        self.cursor = from;
    }

    /// Deletes the char at the cursor.
    pub fn delete(&mut self) {
        self.completing = None;
        if self.cursor >= self.text.chars().count() {
            return;
        }
        let (from, to) = (self.byte_at(self.cursor), self.byte_at(self.cursor + 1));
        self.text.replace_range(from..to, "");
    }

    /// Moves the cursor by `delta` chars, within the text.
    pub fn move_cursor(&mut self, delta: isize) {
        let len = self.text.chars().count();
        self.cursor = self.cursor.saturating_add_signed(delta).min(len);
    }

    /// Moves the cursor to the start or the end.
    pub fn home_end(&mut self, end: bool) {
        self.cursor = if end { self.text.chars().count() } else { 0 };
    }

    /// Empties the line.
    pub fn clear(&mut self) {
        self.text.clear();
        self.cursor = 0;
        self.browsing = None;
        self.completing = None;
    }

    /// Takes the line for submission, remembering it unless it may hold a secret.
    pub fn take(&mut self) -> String {
        let line = std::mem::take(&mut self.text);
        self.clear();
        if !line.trim().is_empty()
            && !crate::command::may_hold_a_secret(&line)
            && self.history.last() != Some(&line)
        {
            self.history.push(line.clone());
            if self.history.len() > HISTORY_MAX {
                self.history.remove(0);
            }
        }
        line
    }

    /// Up (`older`) or Down through the history; the line being typed comes back at the end.
    pub fn recall(&mut self, older: bool) {
        self.completing = None;
        let next = match (self.browsing, older) {
            (None, true) if !self.history.is_empty() => {
                self.draft = self.text.clone();
                Some(self.history.len() - 1)
            }
            (Some(i), true) => Some(i.saturating_sub(1)),
            (Some(i), false) if i + 1 < self.history.len() => Some(i + 1),
            (Some(_), false) => None,
            (None, _) => return,
        };
        self.text = match next {
            Some(i) => self.history[i].clone(),
            None => std::mem::take(&mut self.draft),
        };
        self.browsing = next;
        self.home_end(true);
    }

    /// Completes the word before the cursor from `candidates` (commands, `#channels`, names);
    /// pressed again, cycles through the matches.
    pub fn complete(&mut self, candidates: &[String]) {
        let before: String = self.text.chars().take(self.cursor).collect();
        let start = before
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map_or(0, |(i, c)| i + c.len_utf8());
        let word = before[start..].to_owned();
        let (typed, matches, next) = match self.completing.take() {
            Some((typed, matches, next)) if matches.contains(&word) => (typed, matches, next),
            _ => {
                let lower = word.to_lowercase();
                let mut matches: Vec<String> = candidates
                    .iter()
                    .filter(|c| !word.is_empty() && c.to_lowercase().starts_with(&lower))
                    .cloned()
                    .collect();
                matches.sort();
                matches.dedup();
                (word.clone(), matches, 0)
            }
        };
        let Some(choice) = matches.get(next % matches.len().max(1)).cloned() else {
            return;
        };
        let end = before.len();
        self.text.replace_range(start..end, &choice);
        self.cursor = self.text[..start + choice.len()].chars().count();
        self.completing = Some((typed, matches, next + 1));
    }
}

/// The whole screen's state.
#[derive(Debug, Default)]
pub struct Model {
    /// This user's name.
    pub me: String,
    /// Channels in the order the list shows them.
    pub order: Vec<String>,
    /// Each channel's view.
    pub channels: BTreeMap<String, Channel>,
    /// The channel shown.
    pub current: String,
    /// The input line.
    pub input: Input,
    /// When Ctrl-C last cleared the line, for the second-press rule.
    last_interrupt_ms: Option<u64>,
    /// Known user names, for completion and colours.
    pub names: Vec<String>,
    /// The prompt while a secret is typed (drawn masked, never kept in history).
    pub asking: Option<String>,
    /// The threads this user is in: (channel, seq) of each of their messages and of each
    /// message they replied to, as seen in this session.
    threads: HashSet<(String, u64)>,
    /// Who types where.
    typing: TypingBoard,
    /// Everyone online, once the first full list arrived.
    pub online: Option<BTreeSet<String>>,
}

impl Model {
    /// A model for `me`, showing `channel`.
    pub fn new(me: &str, channel: &str) -> Model {
        let mut model = Model {
            me: me.to_owned(),
            ..Model::default()
        };
        model.open(channel);
        model
    }

    /// Adds `channel` to the list if missing and shows it; its unread counts clear.
    /// Puts `channel` in the list, after the others, without showing it.
    pub fn add(&mut self, channel: &str) {
        if !self.channels.contains_key(channel) {
            self.order.push(channel.to_owned());
            self.channels.insert(channel.to_owned(), Channel::default());
        }
    }

    pub fn open(&mut self, channel: &str) {
        if !self.channels.contains_key(channel) {
            self.order.push(channel.to_owned());
            self.channels.insert(channel.to_owned(), Channel::default());
        }
        self.current = channel.to_owned();
        let view = self.channels.get_mut(channel).expect("inserted above");
        // Above the first unread message; not for a channel never read (all of it is new).
        view.divider = (view.unread > 0 && view.read_to > 0).then_some(view.read_to);
        view.unread = 0;
        view.mentions = 0;
        view.unread_more = false;
    }

    /// The cluster holds `seq` as this user's read marker in `channel` (this client's own
    /// mark, or another client's): messages up to it are read. A channel not shown counts
    /// again what is unread after it.
    pub fn on_marker(&mut self, channel: &str, seq: u64) {
        let shown = self.current == channel;
        let me = self.me.clone();
        let Some(view) = self.channels.get_mut(channel) else {
            return;
        };
        if seq <= view.read_to {
            return;
        }
        view.read_to = seq;
        if !shown {
            view.count_unread(&me);
        }
    }

    /// What the user is reading now: the shown channel's newest message, when the view
    /// follows new messages and it is past the read marker. Moves the marker here at once;
    /// the caller sends it to the cluster.
    pub fn reading(&mut self) -> Option<(String, u64)> {
        let channel = self.current.clone();
        let view = self.channels.get_mut(&channel)?;
        let newest = view
            .lines
            .iter()
            .rev()
            .find_map(|l| match l {
                Line::Message(m) => Some(m.seq),
                Line::Notice { .. } => None,
            })
            .unwrap_or(0)
            .max(view.newest);
        if view.scroll > 0 || newest <= view.read_to {
            return None;
        }
        view.read_to = newest;
        Some((channel, newest))
    }

    /// Shows the next (`forward`) or previous channel in the list.
    pub fn cycle(&mut self, forward: bool) {
        let Some(at) = self.order.iter().position(|c| *c == self.current) else {
            return;
        };
        let len = self.order.len();
        let next = if forward {
            (at + 1) % len
        } else {
            (at + len - 1) % len
        };
        let channel = self.order[next].clone();
        self.open(&channel);
    }

    /// The channel shown.
    pub fn shown(&self) -> &Channel {
        &self.channels[&self.current]
    }

    fn shown_mut(&mut self) -> &mut Channel {
        self.channels
            .get_mut(&self.current)
            .expect("the current channel is always in the map")
    }

    /// Whether `message` of `channel` concerns this user as a mention does (see
    /// [`Shown::mentions_me`]); notes the threads their own messages start or join.
    fn concerns_me(&mut self, channel: &str, message: &Shown) -> bool {
        let replied_to = match &message.relation {
            Some(proto::Relation::Reply { to }) => Some(*to),
            _ => None,
        };
        if message.sender == self.me {
            self.threads.insert((channel.to_owned(), message.seq));
            if let Some(to) = replied_to {
                self.threads.insert((channel.to_owned(), to));
            }
            return false;
        }
        // Every message of a direct conversation is addressed to its members.
        proto::is_direct_channel(channel)
            || Model::mentions(&self.me, &message.text)
            || replied_to.is_some_and(|to| self.threads.contains(&(channel.to_owned(), to)))
    }

    /// Whether `text` mentions `me`: `@me` as a word, any case.
    pub fn mentions(me: &str, text: &str) -> bool {
        let needle = format!("@{}", me.to_lowercase());
        let lower = text.to_lowercase();
        lower.match_indices(&needle).any(|(at, _)| {
            let after = lower[at + needle.len()..].chars().next();
            !after.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-')
        })
    }

    /// `user` types in `channel`: shown until `until_ms`, or until their next message there.
    pub fn on_typing(&mut self, channel: &str, user: &str, until_ms: u64) {
        if user != self.me {
            self.typing.heard(channel, user, until_ms);
        }
    }

    /// Who came online and who went offline; `full` replaces the list.
    pub fn on_presence(&mut self, online: Vec<String>, offline: &[String], full: bool) {
        let known = self.online.get_or_insert_with(BTreeSet::new);
        if full {
            known.clear();
        }
        known.extend(online);
        for user in offline {
            known.remove(user);
            self.typing.gone(user);
        }
    }

    /// The users typing in `channel` at `now_ms`, by name; forgets the ones whose time ran
    /// out.
    pub fn typing_in(&mut self, channel: &str, now_ms: u64) -> Vec<String> {
        self.typing.typing_in(channel, now_ms)
    }

    /// A new message in `channel` (live or caught up). Returns [`Action::Bell`] when it
    /// mentions this user and is not this user's own.
    pub fn on_message(&mut self, channel: &str, mut message: Shown) -> Action {
        self.typing.spoke(channel, &message.sender);
        message.mentions_me = self.concerns_me(channel, &message);
        if !self.names.contains(&message.sender) {
            self.names.push(message.sender.clone());
        }
        if !self.channels.contains_key(channel) {
            self.order.push(channel.to_owned());
            self.channels.insert(channel.to_owned(), Channel::default());
        }
        let shown = self.current == channel;
        let view = self.channels.get_mut(channel).expect("inserted above");
        // A stream delivers in seq order, so anything at or below the newest seq held is a
        // duplicate (a resumed stream) or belongs to a history page.
        let newest = view.lines.iter().rev().find_map(|l| match l {
            Line::Message(m) => Some(m.seq),
            Line::Notice { .. } => None,
        });
        if newest.is_some_and(|newest| message.seq <= newest) || message.seq <= view.newest {
            return Action::None;
        }
        view.newest = message.seq;
        if message.is_folded() {
            // Edits, deletes and reactions change their target's line and count as nothing
            // new; a target older than the scrollback shows them when paged in (the nodes
            // send it as it stands then).
            let target = message.relation.as_ref().map_or(0, proto::Relation::target);
            if let Some(Line::Message(t)) = view
                .lines
                .iter_mut()
                .rev()
                .find(|l| matches!(l, Line::Message(t) if t.seq == target))
            {
                message.fold_into(t);
            }
            return Action::None;
        }
        if let Some(proto::Relation::Reply { to }) = message.relation {
            // The answered message's line counts it at once, as a reader of it later would.
            if let Some(Line::Message(t)) = view
                .lines
                .iter_mut()
                .rev()
                .find(|l| matches!(l, Line::Message(t) if t.seq == to))
            {
                t.replies += 1;
            }
        }
        let mention = message.mentions_me;
        if !shown && message.sender != self.me {
            view.unread += 1;
            view.mentions += u32::from(mention);
        }
        if view.oldest_seq.is_none() {
            view.oldest_seq = Some(message.seq);
        }
        view.lines.push_back(Line::Message(message));
        if view.scroll > 0 {
            // Reading older lines: keep them where they are on screen.
            view.scroll += 1;
        }
        view.trim();
        if mention && !view.muted {
            Action::Bell
        } else {
            Action::None
        }
    }

    /// Older messages of `channel`, oldest first, from a page of history; `at_start` when
    /// the servers have nothing before them.
    pub fn on_older(&mut self, channel: &str, mut older: Vec<Shown>, at_start: bool) {
        // Oldest first, so a thread this user started on the page is known before its replies.
        for message in &mut older {
            message.mentions_me = self.concerns_me(channel, message);
        }
        let me = self.me.clone();
        let Some(view) = self.channels.get_mut(channel) else {
            return;
        };
        let oldest = view.oldest_seq.unwrap_or(u64::MAX);
        let mut added = 0;
        for message in older.into_iter().rev().filter(|m| m.seq < oldest) {
            view.oldest_seq = Some(message.seq);
            if message.is_folded() {
                // Its target, read with it, already shows what it did.
                continue;
            }
            view.lines.push_front(Line::Message(message));
            added += 1;
        }
        if view.scroll > 0 {
            view.scroll += added;
        }
        view.at_start = at_start;
        if !std::mem::replace(&mut view.loaded, true) {
            // The first page: what is new since the marker is unread, or, shown, marked.
            if self.current == channel {
                view.count_unread(&me);
                view.divider = (view.read_to > 0 && view.unread > 0).then_some(view.read_to);
                (view.unread, view.mentions, view.unread_more) = (0, 0, false);
            } else {
                view.count_unread(&me);
            }
        }
    }

    /// A notice in the channel shown.
    pub fn notice(&mut self, at_ms: u64, text: &str) {
        let current = self.current.clone();
        self.notice_in(&current, at_ms, text);
    }

    /// A notice in `channel` (the one shown if it is no longer listed).
    pub fn notice_in(&mut self, channel: &str, at_ms: u64, text: &str) {
        let text = crate::output::sanitize_lines(text);
        let view = match self.channels.get_mut(channel) {
            Some(view) => view,
            None => self.shown_mut(),
        };
        view.lines.push_back(Line::Notice { at_ms, text });
        if view.scroll > 0 {
            view.scroll += 1;
        }
        view.trim();
    }

    /// Mutes or unmutes `channel`; `false` if it is not in the list.
    pub fn mute(&mut self, channel: &str, muted: bool) -> bool {
        match self.channels.get_mut(channel) {
            Some(view) => {
                view.muted = muted;
                true
            }
            None => false,
        }
    }

    /// The muted channels, in list order.
    pub fn muted(&self) -> Vec<String> {
        self.order
            .iter()
            .filter(|c| self.channels.get(*c).is_some_and(|v| v.muted))
            .cloned()
            .collect()
    }

    /// Takes `channel` off the list and shows the one before it; `false` for the last one.
    pub fn close(&mut self, channel: &str) -> bool {
        if self.order.len() <= 1 {
            return false;
        }
        let Some(at) = self.order.iter().position(|c| c == channel) else {
            return false;
        };
        self.order.remove(at);
        self.channels.remove(channel);
        if self.current == channel {
            let next = self.order[at.saturating_sub(1)].clone();
            self.open(&next);
        }
        true
    }

    /// A bracketed paste: see [`Input::paste`]; one ending in a line break is entered.
    pub fn paste(&mut self, text: &str) -> Action {
        if self.input.paste(text) {
            self.submit()
        } else {
            Action::None
        }
    }

    /// Asks for a secret: the next line entered is [`Action::Secret`].
    pub fn ask(&mut self, prompt: String) {
        self.input.clear();
        self.asking = Some(prompt);
    }

    /// Scrolls the shown channel up (`up`) by `lines`, or down, with `page` lines on screen:
    /// at most until the oldest line held is at the top. Returns a request for older history
    /// when the top is on screen and the servers may hold more.
    pub fn scroll(&mut self, up: bool, lines: usize, page: usize) -> Action {
        let current = self.current.clone();
        let view = self.shown_mut();
        if up {
            let top = view.lines.len().saturating_sub(page);
            view.scroll = (view.scroll + lines).min(top);
            if view.scroll >= top && !view.at_start {
                if let Some(before) = view.oldest_seq.filter(|s| *s > 1) {
                    return Action::PageBack {
                        channel: current,
                        before,
                    };
                }
            }
        } else {
            view.scroll = view.scroll.saturating_sub(lines);
        }
        Action::None
    }

    /// Home (`top`) scrolls to the oldest line held, fetching older ones; End follows new
    /// messages again.
    pub fn scroll_to(&mut self, top: bool, page: usize) -> Action {
        if top {
            let len = self.shown().lines.len();
            self.scroll(true, len, page)
        } else {
            let view = self.shown_mut();
            view.scroll = 0;
            view.trim();
            Action::None
        }
    }

    /// Ctrl-C at `now_ms`: clears a non-empty line; on an empty line, or a second time within
    /// [`QUIT_WINDOW_MS`], quits.
    pub fn interrupt(&mut self, now_ms: u64) -> Action {
        let again = self
            .last_interrupt_ms
            .is_some_and(|at| now_ms.saturating_sub(at) <= QUIT_WINDOW_MS);
        if again {
            return Action::Quit;
        }
        self.last_interrupt_ms = Some(now_ms);
        if self.asking.take().is_some() {
            self.input.clear();
            self.notice(now_ms, "not asked any more: nothing changed");
        } else if self.input.text.is_empty() {
            self.notice(now_ms, "press Ctrl-C again (or Ctrl-D) to quit");
        } else {
            self.input.clear();
        }
        Action::None
    }

    /// Enter: the typed line, to be sent or run.
    pub fn submit(&mut self) -> Action {
        self.last_interrupt_ms = None;
        if self.asking.take().is_some() {
            let secret = std::mem::take(&mut self.input.text);
            self.input.clear();
            return Action::Secret(secret);
        }
        if self.input.text.trim().is_empty() {
            return Action::None;
        }
        Action::Submit(self.input.take())
    }

    /// What Tab completes from: commands, `#channels`, `@names` and names.
    pub fn completions(&self) -> Vec<String> {
        let mut all: Vec<String> = crate::command::NAMES
            .iter()
            .map(|c| (*c).to_owned())
            .collect();
        all.extend(self.order.iter().map(|c| format!("#{c}")));
        all.extend(self.names.iter().map(|n| format!("@{n}")));
        all.extend(self.names.iter().cloned());
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, sender: &str, text: &str) -> Shown {
        Shown {
            seq,
            sender: sender.into(),
            text: text.into(),
            at_ms: seq * 1000,
            ..Shown::default()
        }
    }

    #[test]
    fn edits_deletes_and_reactions_change_their_target_and_are_not_unread() {
        let mut m = Model::new("alice", "general");
        m.on_message("general", msg(1, "bob", "helo"));
        m.open("ops");
        let related = |seq: u64, sender: &str, text: &str, relation| Shown {
            relation: Some(relation),
            ..msg(seq, sender, text)
        };
        m.on_message(
            "general",
            related(2, "bob", "hello", proto::Relation::Edit { of: 1 }),
        );
        // A forged edit by someone else changes nothing.
        m.on_message(
            "general",
            related(3, "eve", "pay me", proto::Relation::Edit { of: 1 }),
        );
        for (seq, who, on) in [(4, "carol", true), (5, "dave", true), (6, "carol", false)] {
            let react = proto::Relation::React {
                to: 1,
                emoji: "👍".into(),
                on,
            };
            m.on_message("general", related(seq, who, "", react));
        }
        m.on_message(
            "general",
            related(7, "bob", "yes", proto::Relation::Reply { to: 1 }),
        );
        let general = &m.channels["general"];
        assert_eq!(
            general.unread, 1,
            "the reply only: edits and reactions are not new"
        );
        let Line::Message(first) = &general.lines[0] else {
            panic!("a message")
        };
        assert_eq!((first.text.as_str(), first.edited), ("hello", true));
        assert_eq!(
            first.reactions,
            vec![("👍".to_owned(), vec!["dave".to_owned()])]
        );
        assert_eq!(general.lines.len(), 2);
        // A repeat of an already folded reaction is ignored.
        let again = proto::Relation::React {
            to: 1,
            emoji: "🎉".into(),
            on: true,
        };
        m.on_message("general", related(5, "dave", "", again));
        m.on_message(
            "general",
            related(8, "bob", "", proto::Relation::Delete { of: 1 }),
        );
        let Line::Message(first) = &m.channels["general"].lines[0] else {
            panic!("a message")
        };
        assert!(first.deleted && first.reactions.is_empty());
        assert_eq!(first.text, "[deleted]");
    }

    #[test]
    fn a_paste_shows_at_once_and_enter_submits_it() {
        let mut m = Model::new("alice", "general");
        m.input.insert("abcdef");
        assert_eq!(m.input.text, "abcdef");
        assert_eq!(m.input.cursor, 6);
        assert_eq!(m.submit(), Action::Submit("abcdef".into()));
        assert!(m.input.text.is_empty());
    }

    #[test]
    fn unread_counts_rise_elsewhere_and_clear_when_opened() {
        let mut m = Model::new("alice", "general");
        m.open("random");
        m.open("general");
        assert_eq!(m.on_message("random", msg(1, "bob", "hi")), Action::None);
        assert_eq!(
            m.on_message("random", msg(2, "bob", "hey @Alice!")),
            Action::Bell
        );
        assert_eq!(m.on_message("random", msg(3, "alice", "me")), Action::None);
        assert_eq!(
            (m.channels["random"].unread, m.channels["random"].mentions),
            (2, 1)
        );
        m.on_message("general", msg(1, "bob", "here"));
        assert_eq!(m.channels["general"].unread, 0);
        m.open("random");
        assert_eq!(
            (m.channels["random"].unread, m.channels["random"].mentions),
            (0, 0)
        );
        // A message seen twice (a resumed stream) counts once.
        m.open("general");
        m.on_message("random", msg(4, "bob", "x"));
        m.on_message("random", msg(4, "bob", "x"));
        assert_eq!(m.channels["random"].unread, 1);
    }

    #[test]
    fn read_markers_count_what_is_new_mark_what_is_read_and_place_the_divider() {
        let mut m = Model::new("alice", "general");
        m.open("random");
        m.open("general");
        // The marker arrives before the first page: what follows it, not alice's, is unread.
        m.on_marker("random", 2);
        let page = vec![
            msg(1, "bob", "a"),
            msg(2, "bob", "b"),
            msg(3, "bob", "@alice c"),
            msg(4, "alice", "mine"),
        ];
        m.on_older("random", page, true);
        let counts = |m: &Model| (m.channels["random"].unread, m.channels["random"].mentions);
        assert_eq!(counts(&m), (1, 1));
        // Another of alice's clients read on; a lower marker after it changes nothing.
        m.on_marker("random", 4);
        assert_eq!(counts(&m), (0, 0));
        m.on_marker("random", 1);
        assert_eq!(m.channels["random"].read_to, 4);

        // The shown channel's first page puts the divider after the marker, and what is
        // shown is read at once, once.
        m.on_marker("general", 1);
        m.on_older(
            "general",
            vec![msg(1, "bob", "x"), msg(2, "bob", "y")],
            true,
        );
        assert_eq!(m.channels["general"].divider, Some(1));
        assert_eq!(m.channels["general"].unread, 0);
        assert_eq!(m.reading(), Some(("general".to_owned(), 2)));
        assert_eq!(m.reading(), None);

        // A channel opened with unread messages shows where they start; scrolled up, the
        // newest is not read yet.
        m.on_message("random", msg(5, "bob", "new"));
        assert_eq!(counts(&m), (1, 0));
        m.open("random");
        assert_eq!(m.channels["random"].divider, Some(4));
        m.channels.get_mut("random").expect("listed").scroll = 3;
        assert_eq!(m.reading(), None);
        m.channels.get_mut("random").expect("listed").scroll = 0;
        assert_eq!(m.reading(), Some(("random".to_owned(), 5)));
        // Never read, nothing to divide: everything is new.
        m.on_message("fresh", msg(1, "bob", "hello"));
        m.open("fresh");
        assert_eq!(m.channels["fresh"].divider, None);

        // More unread than the first page holds: counted as held, and marked as more.
        m.open("busy");
        m.open("general");
        m.on_marker("busy", 10);
        m.on_older(
            "busy",
            vec![msg(50, "bob", "x"), msg(51, "bob", "y")],
            false,
        );
        let busy = &m.channels["busy"];
        assert_eq!((busy.unread, busy.unread_more), (2, true));
        m.open("busy");
        assert!(!m.channels["busy"].unread_more);
    }

    #[test]
    fn a_reply_in_a_thread_this_user_is_in_counts_as_a_mention() {
        let mut m = Model::new("alice", "general");
        m.open("random");
        let reply = |seq: u64, sender: &str, to: u64| Shown {
            relation: Some(proto::Relation::Reply { to }),
            ..msg(seq, sender, "sure")
        };
        // Alice's own message (from history) and Bob's message she answered.
        m.on_older(
            "random",
            vec![msg(1, "alice", "lunch?"), msg(2, "bob", "standup")],
            true,
        );
        m.on_message("random", reply(3, "alice", 2));
        m.open("general");
        // Replies to either are hers to see; a reply in someone else's thread is not.
        assert_eq!(m.on_message("random", reply(4, "carol", 1)), Action::Bell);
        assert_eq!(m.on_message("random", reply(5, "carol", 2)), Action::Bell);
        m.on_message("random", msg(6, "carol", "other"));
        assert_eq!(m.on_message("random", reply(7, "bob", 6)), Action::None);
        assert_eq!(
            (m.channels["random"].unread, m.channels["random"].mentions),
            (4, 2)
        );
        // Each live reply is counted on the line it answers.
        let replies = |seq: u64| {
            m.channels["random"].lines.iter().find_map(|l| match l {
                Line::Message(t) if t.seq == seq => Some(t.replies),
                _ => None,
            })
        };
        assert_eq!(
            (replies(1), replies(2), replies(6)),
            (Some(1), Some(2), Some(1))
        );
    }

    #[test]
    fn a_muted_channel_counts_but_never_rings() {
        let mut m = Model::new("alice", "general");
        m.open("noisy");
        m.open("general");
        assert!(m.mute("noisy", true));
        assert!(!m.mute("unknown", true));
        assert_eq!(
            m.on_message("noisy", msg(1, "bob", "@alice hi")),
            Action::None
        );
        assert_eq!(
            (m.channels["noisy"].unread, m.channels["noisy"].mentions),
            (1, 1)
        );
        assert_eq!(m.muted(), ["noisy"]);
        m.mute("noisy", false);
        assert_eq!(
            m.on_message("noisy", msg(2, "bob", "@alice hi")),
            Action::Bell
        );
        assert!(m.muted().is_empty());
    }

    #[test]
    fn mentions_are_whole_names_in_any_case() {
        assert!(Model::mentions("alice", "hi @alice"));
        assert!(Model::mentions("alice", "@ALICE: look"));
        assert!(!Model::mentions("alice", "hi @alicex"));
        assert!(!Model::mentions("alice", "hi alice"));
        assert!(Model::mentions("al", "@al, @alan"));
    }

    #[test]
    fn ctrl_c_clears_the_line_and_a_second_one_quits() {
        let mut m = Model::new("alice", "general");
        m.input.insert("half typed");
        assert_eq!(m.interrupt(10_000), Action::None);
        assert!(m.input.text.is_empty());
        assert_eq!(m.interrupt(11_000), Action::Quit);
        let mut m = Model::new("alice", "general");
        m.input.insert("x");
        m.interrupt(10_000);
        assert_eq!(m.interrupt(10_000 + QUIT_WINDOW_MS + 1), Action::None);
    }

    #[test]
    fn history_skips_secrets_and_keeps_the_draft() {
        let mut m = Model::new("alice", "general");
        for line in ["one", "/key hunter2", "two"] {
            m.input.insert(line);
            m.submit();
        }
        assert_eq!(m.input.history, ["one", "two"]);
        m.input.insert("dra");
        m.input.recall(true);
        assert_eq!(m.input.text, "two");
        m.input.recall(true);
        m.input.recall(true);
        assert_eq!(m.input.text, "one");
        m.input.recall(false);
        m.input.recall(false);
        assert_eq!(m.input.text, "dra");
    }

    #[test]
    fn tab_completes_and_cycles() {
        let mut m = Model::new("alice", "general");
        m.open("gossip");
        m.on_message("general", msg(1, "bob", "x"));
        m.input.insert("/jo");
        m.input.complete(&m.completions());
        assert_eq!(m.input.text, "/join");
        m.input.insert(" #g");
        let all = m.completions();
        m.input.complete(&all);
        assert_eq!(m.input.text, "/join #general");
        m.input.complete(&all);
        assert_eq!(m.input.text, "/join #gossip");
        m.input.clear();
        m.input.insert("hi @b");
        m.input.complete(&m.completions());
        assert_eq!(m.input.text, "hi @bob");
    }

    #[test]
    fn scrolling_to_the_top_asks_for_older_history_until_the_start() {
        let mut m = Model::new("alice", "general");
        for seq in 50..=60 {
            m.on_message("general", msg(seq, "bob", "x"));
        }
        assert_eq!(
            m.scroll(true, 20, 5),
            Action::PageBack {
                channel: "general".into(),
                before: 50
            }
        );
        assert_eq!(m.shown().scroll, 6, "the oldest line stops at the top");
        m.on_older(
            "general",
            (40..50).map(|s| msg(s, "bob", "y")).collect(),
            false,
        );
        assert_eq!(
            m.shown().scroll,
            16,
            "the lines on screen stay where they were"
        );
        assert_eq!(m.shown().oldest_seq, Some(40));
        assert_eq!(m.shown().lines.len(), 21);
        m.on_older(
            "general",
            (1..40).map(|s| msg(s, "bob", "y")).collect(),
            true,
        );
        assert_eq!(m.scroll_to(true, 10), Action::None);
        assert_eq!(m.scroll_to(false, 10), Action::None);
        assert_eq!(m.shown().scroll, 0);
    }

    #[test]
    fn a_paste_with_binary_and_a_final_line_break_is_entered_at_once() {
        let mut m = Model::new("alice", "general");
        let action = m.paste("one\r\ntwo\u{1b}[2J\tx\n");
        assert_eq!(action, Action::Submit("one\ntwo\u{fffd}[2J x".into()));
        assert_eq!(m.paste("no enter"), Action::None);
        assert_eq!(m.input.text, "no enter");
    }

    #[test]
    fn a_secret_is_never_kept_and_ctrl_c_cancels_it() {
        let mut m = Model::new("alice", "general");
        m.ask("passphrase for #general: ".into());
        m.input.insert("hunter2");
        assert_eq!(m.submit(), Action::Secret("hunter2".into()));
        assert!(m.input.history.is_empty());
        assert!(m.asking.is_none());
        m.ask("again".into());
        m.input.insert("x");
        assert_eq!(m.interrupt(1), Action::None);
        assert!(m.asking.is_none() && m.input.text.is_empty());
    }

    #[test]
    fn closing_a_channel_shows_the_one_before_and_the_last_stays() {
        let mut m = Model::new("alice", "general");
        m.open("random");
        assert!(m.close("random"));
        assert_eq!(m.current, "general");
        assert!(!m.close("general"));
    }

    #[test]
    fn the_scrollback_is_bounded_and_pages_in_again() {
        let mut m = Model::new("alice", "general");
        for seq in 1..=(SCROLLBACK_MAX as u64 + 5) {
            m.on_message("general", msg(seq, "bob", "x"));
        }
        assert_eq!(m.shown().lines.len(), SCROLLBACK_MAX);
        assert_eq!(m.shown().oldest_seq, Some(6));
        assert!(!m.shown().at_start);
    }

    #[test]
    fn typing_shows_others_until_they_speak_and_presence_follows_full_lists_and_changes() {
        let mut m = Model::new("alice", "general");
        m.on_typing("general", "alice", 5_000);
        m.on_typing("general", "bob", 5_000);
        m.on_typing("ops", "carol", 5_000);
        assert_eq!(m.typing_in("general", 1_000), vec!["bob"], "never oneself");
        m.on_message("general", msg(1, "bob", "done"));
        assert!(m.typing_in("general", 1_000).is_empty(), "bob spoke");
        assert_eq!(m.typing_in("ops", 1_000), vec!["carol"]);
        assert!(m.online.is_none(), "unknown before the first list");
        m.on_presence(vec!["alice".into(), "carol".into()], &[], true);
        m.on_presence(vec!["bob".into()], &["carol".into()], false);
        let online: Vec<&str> = m.online.iter().flatten().map(String::as_str).collect();
        assert_eq!(online, vec!["alice", "bob"]);
        assert!(m.typing_in("ops", 1_000).is_empty(), "carol left");
        m.on_presence(vec!["dave".into()], &[], true);
        assert_eq!(
            m.online.as_ref().map(BTreeSet::len),
            Some(1),
            "a full list replaces"
        );
    }
}
