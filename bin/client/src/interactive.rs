//! The line mode of the chat (`--plain`, pipes, `TERM=dumb`): one channel at a time, each
//! incoming message printed as a line above the input (see `lineedit`), commands handled
//! here.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use cellchat_client::crypto;
use cellchat_client::{Client, Ephemeral, WireMessage};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::actions::{self, lock, Encrypted, Keys, Queued};
use crate::command::{self, Input};
use crate::lineedit::{self, FromEditor, Screen};
use crate::marks::{Marks, MARK_DRAIN_MAX};
use crate::typing::{TypingBoard, TypingTeller};
use crate::{output, timefmt};

/// Messages shown when joining a channel.
const JOIN_HISTORY: u32 = 50;
/// Longest wait at exit for queued lines to be acknowledged (the default retry budget).
const SEND_DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// Lines queued for sending before the prompt waits.
const SEND_QUEUE: usize = 64;

struct Chat {
    client: Client,
    channel: String,
    previous: Vec<String>,
    /// Channels whose "added" news was said already (a client may hear it from two nodes).
    announced: HashSet<String>,
    keys: Keys,
    encrypted: Encrypted,
    /// The seq of the oldest message of this channel shown so far, where `/more` pages on.
    oldest_shown: Option<u64>,
    screen: Screen,
    stream: Option<JoinHandle<()>>,
    send_tx: mpsc::Sender<Queued>,
    /// What this user has seen, for the read markers.
    marks: Marks,
    /// Who types where (the prompt shows it for this channel).
    typing: Arc<Mutex<TypingBoard>>,
    /// Tells the cluster when this user types.
    teller: TypingTeller,
}

/// Asks for a secret on the terminal without echoing it (each typed character shows as `*`),
/// and never adds it to any input history. `None` at end of input.
pub fn ask_secret(prompt: &str) -> Option<String> {
    lineedit::ask_secret(prompt)
}

/// Runs the chat until `/quit` or end of input.
///
/// # Errors
///
/// None today; the signature leaves room for a terminal that cannot be set up.
pub async fn run(
    client: Client,
    channel: String,
    keys: Option<crypto::Keys>,
) -> anyhow::Result<()> {
    let (screen, mut from_editor, editor) = lineedit::start();
    let channel_keys: Keys = Arc::new(Mutex::new(HashMap::new()));
    if let Some(keys) = keys {
        lock(&channel_keys).insert(channel.clone(), keys);
    }
    let keys = channel_keys;
    let (send_tx, send_rx) = mpsc::channel(SEND_QUEUE);
    let say = |screen: Screen| move |line: String| screen.print(line);
    let sender = tokio::spawn(actions::send_loop(
        client.clone(),
        send_rx,
        say(screen.clone()),
    ));
    tokio::spawn(actions::event_loop(client.clone(), say(screen.clone())));
    let (marks, marker) = Marks::start(client.clone());
    let mut chat = Chat {
        client,
        channel,
        previous: Vec::new(),
        announced: HashSet::new(),
        keys,
        encrypted: Arc::new(Mutex::new(HashSet::new())),
        oldest_shown: None,
        screen,
        stream: None,
        send_tx,
        marks,
        typing: Arc::default(),
        teller: TypingTeller::default(),
    };
    // Presence on, so /members knows who is online.
    let mut heard = chat.client.ephemeral();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    chat.out(format!(
        "connected to cluster {:?} as {}; type /help for commands",
        chat.client.cluster_name(),
        chat.client.name().unwrap_or("?")
    ));
    chat.enter(chat.channel.clone()).await;
    let mut prompt = chat.prompt();
    chat.screen.prompt(prompt.clone());
    loop {
        tokio::select! {
            event = from_editor.recv() => match event {
                Some(FromEditor::Line(line)) => {
                    chat.teller.entered(&chat.channel);
                    if chat.handle_line(&line).await == Next::Quit {
                        break;
                    }
                }
                Some(FromEditor::Secret(passphrase)) => chat.set_key(&passphrase).await,
                Some(FromEditor::Typed(text)) => {
                    chat.teller.typed(&chat.client, &chat.channel, &text, timefmt::now_ms());
                }
                Some(FromEditor::Quit) | None => break,
            },
            event = heard.recv() => match event {
                Ok(Ephemeral::Typing { channel, user }) => {
                    let until = timefmt::now_ms() + proto::push::TYPING_SHOW_MS;
                    lock(&chat.typing).heard(&channel, &user, until);
                }
                Ok(Ephemeral::Marker { channel, read_to }) => chat.marks.known(&channel, read_to),
                Ok(Ephemeral::Added { channel }) => chat.added(&channel).await,
                Ok(Ephemeral::Presence { offline, .. }) => {
                    for user in offline {
                        lock(&chat.typing).gone(&user);
                    }
                }
                // Missed events: typing notes are renewed every few seconds.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {}
        }
        // Redrawn only when it changed, so the line being typed is not disturbed for nothing.
        let now = chat.prompt();
        if now != prompt {
            prompt = now;
            chat.screen.prompt(prompt.clone());
        }
    }
    if let Some(stream) = chat.stream.take() {
        stream.abort();
    }
    // Lines typed before /quit are still sent: close the queue and let the sender finish it,
    // bounded by the client's retry budget.
    let Chat {
        send_tx,
        screen,
        marks,
        ..
    } = chat;
    drop(send_tx);
    marks.close();
    // Everything printed is shown before the editor gives the terminal back.
    screen.close();
    drop(from_editor);
    let _ = editor.await;
    if tokio::time::timeout(SEND_DRAIN_MAX, sender).await.is_err() {
        println!("some lines were not acknowledged in time and may not have been sent");
    }
    // A marker left behind only shows some messages as new again next time.
    let _ = tokio::time::timeout(MARK_DRAIN_MAX, marker).await;
    Ok(())
}

/// Whether the chat goes on after a line.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    More,
    Quit,
}

impl Chat {
    fn prompt(&self) -> String {
        let typing = lock(&self.typing).typing_in(&self.channel, timefmt::now_ms());
        let typing = if typing.is_empty() {
            String::new()
        } else {
            format!("({}) ", output::typing_text(&typing))
        };
        let status = self.client.status();
        // A node is shown by name; by id only until its announcement has been heard.
        let label = |id: u64, name: &Option<String>| {
            name.as_deref()
                .map_or_else(|| id.to_string(), output::sanitize)
        };
        let reading = match (status.reading, status.reading_rtt_ms) {
            (Some(id), Some(rtt)) => format!("@{} {rtt:.1}ms", label(id, &status.reading_name)),
            (Some(id), None) => format!("@{}", label(id, &status.reading_name)),
            (None, _) => "@?".to_owned(),
        };
        let leader = status.leader.map_or_else(
            || "no leader".to_owned(),
            |id| format!("leader {}", label(id, &status.leader_name)),
        );
        let e2e = if lock(&self.keys).contains_key(&self.channel) {
            " [e2e]"
        } else {
            ""
        };
        let here = actions::label(&self.channel);
        format!("{typing}{here}{e2e} {reading} ({leader})> ")
    }

    fn out(&self, line: impl Into<String>) {
        self.screen.print(line);
    }

    fn say(&self, lines: Vec<String>) {
        for line in lines {
            self.out(line);
        }
    }

    async fn handle_line(&mut self, line: &str) -> Next {
        let input = match command::parse(line) {
            Ok(input) => input,
            Err(message) => {
                self.out(message);
                return Next::More;
            }
        };
        match input {
            Input::Message(text) => {
                match actions::send_key(&self.keys, &self.encrypted, &self.channel) {
                    Ok(key) => self.queue(text, key).await,
                    Err(refusal) => self.out(refusal),
                }
            }
            Input::Plain(text) => self.queue(text, None).await,
            Input::Relate { relation, text } => {
                match actions::relation_key(&self.keys, &self.encrypted, &self.channel, &relation) {
                    Ok(key) => self.queue_related(text, key, Some(relation)).await,
                    Err(refusal) => self.out(refusal),
                }
            }
            Input::Search(query) => {
                let (client, keys, encrypted) = (&self.client, &self.keys, &self.encrypted);
                self.say(actions::search(client, keys, encrypted, &self.channel, &query).await);
            }
            Input::Thread(seq) => {
                let (client, keys, encrypted) = (&self.client, &self.keys, &self.encrypted);
                self.say(actions::thread(client, keys, encrypted, &self.channel, seq).await);
            }
            Input::Join(channel) => {
                if channel != self.channel {
                    self.previous.push(self.channel.clone());
                    self.enter(channel).await;
                }
            }
            Input::Direct(with) => {
                match actions::open_direct(&self.client, &self.keys, &self.encrypted, &with).await {
                    Ok((channel, line)) => {
                        self.out(line);
                        if channel != self.channel {
                            self.previous.push(self.channel.clone());
                            self.enter(channel).await;
                        }
                    }
                    Err(refusal) => self.out(refusal),
                }
            }
            Input::Leave => match self.previous.pop() {
                Some(channel) => {
                    self.out(format!("left #{}", self.channel));
                    self.enter(channel).await;
                }
                None => self.out(format!(
                    "#{} is your first channel: /join another, or /quit",
                    self.channel
                )),
            },
            Input::Channels => self.say(actions::channels(&self.client, &self.channel).await),
            Input::History(n) => self.history(None, n).await,
            Input::More(n) => match self.oldest_shown {
                Some(oldest) if oldest > 1 => self.history(Some(oldest), n).await,
                _ => self.out(format!("that is the start of #{}", self.channel)),
            },
            Input::Who => self.say(actions::who(&self.client, &self.channel).await),
            Input::Servers => self.out(output::servers_table(&self.client.servers().await)),
            Input::KeyPrompt => {
                self.screen
                    .ask_secret(format!("passphrase for #{}: ", self.channel));
            }
            Input::Key(passphrase) => self.set_key(&passphrase).await,
            Input::KeyClear => {
                lock(&self.keys).remove(&self.channel);
                self.out(format!(
                    "#{}: passphrase forgotten; new messages are sent in the clear",
                    self.channel
                ));
            }
            Input::Create { channel, private } => {
                self.out(actions::create(&self.client, &channel, private).await);
            }
            Input::Invite(user) => {
                self.out(actions::invite(&self.client, &self.channel, &user).await);
            }
            Input::Accept(channel) => match actions::accept(&self.client, &channel).await {
                Ok(joined) => {
                    self.out(joined);
                    if channel != self.channel {
                        self.previous.push(self.channel.clone());
                        self.enter(channel).await;
                    }
                }
                Err(refusal) => self.out(refusal),
            },
            Input::Remove(user) => {
                self.out(actions::remove(&self.client, &self.channel, &user).await);
            }
            Input::Members => self.say(actions::members(&self.client, &self.channel).await),
            Input::RetentionShow => self.say(actions::retention(&self.client, &self.channel).await),
            Input::TopicShow => self.say(actions::topic(&self.client, &self.channel).await),
            Input::TopicSet(topic) => {
                self.say(actions::set_topic(&self.client, &self.channel, topic).await)
            }
            Input::RetentionSet(retention) => {
                self.say(actions::set_retention(&self.client, &self.channel, retention).await)
            }
            Input::Mute(_) => self.out(
                "the line mode shows one channel at a time: /mute is for the full-screen chat's \
                 channel list; nothing changed",
            ),
            Input::Help => self.out(command::HELP),
            Input::Quit => return Next::Quit,
        }
        Next::More
    }

    async fn queue(&self, text: String, key: Option<crypto::ChannelKeyV2>) {
        self.queue_related(text, key, None).await;
    }

    async fn queue_related(
        &self,
        text: String,
        key: Option<crypto::ChannelKeyV2>,
        relation: Option<proto::Relation>,
    ) {
        if self
            .send_tx
            .send((self.channel.clone(), text, key, relation))
            .await
            .is_err()
        {
            self.out("the sender stopped: restart the client");
        }
    }

    /// Someone started a direct conversation with this user, or invited them: said once.
    async fn added(&mut self, channel: &str) {
        if !self.announced.insert(channel.to_owned()) || channel == self.channel {
            return;
        }
        if !proto::is_direct_channel(channel) {
            let name = output::sanitize(channel);
            self.out(format!(
                "you are invited to #{name}: /accept #{name} joins it"
            ));
            return;
        }
        let detail = self.client.channel_info(channel).await;
        let members = detail.map(|d| d.info.direct).unwrap_or_default();
        let me = self.client.name().unwrap_or_default().to_owned();
        actions::learn_direct(&me, channel, &members);
        let label = actions::label(channel);
        if label.starts_with('@') {
            let names = label.trim_start_matches('@').replace(", ", " ");
            self.out(format!(
                "{} started a direct conversation with you: /dm {} opens it",
                output::sanitize(&label),
                output::sanitize(&names)
            ));
        }
    }

    /// Switches to `channel`: shows its recent history and streams what follows.
    async fn enter(&mut self, channel: String) {
        if let Some(stream) = self.stream.take() {
            stream.abort();
        }
        self.channel = channel;
        self.oldest_shown = None;
        if let Some(notice) =
            actions::security_notice(&self.client, &self.keys, &self.encrypted, &self.channel).await
        {
            self.out(notice);
        }
        if let Some(notice) = actions::topic_notice(&self.client, &self.channel).await {
            self.out(notice);
        }
        // Where this user stopped reading, on any of their clients; 0 when never, or when
        // it cannot be read (nothing is then marked as new).
        let read_to = match self.client.channel_info(&self.channel).await {
            Ok(detail) => detail.info.read_to,
            Err(_) => 0,
        };
        let head = match self.client.history(&self.channel, None, JOIN_HISTORY).await {
            Ok(page) => {
                self.out(format!(
                    "-- {} ({} messages) --",
                    actions::label(&self.channel),
                    page.head
                ));
                self.oldest_shown = page.messages.first().map(|m| m.seq);
                let now = timefmt::now_ms();
                let mut divider = read_to > 0 && read_to < page.head;
                if divider && self.oldest_shown.is_some_and(|oldest| oldest > read_to + 1) {
                    self.out(format!(
                        "-- new since you last read: from #{} (older ones: /more) --",
                        read_to + 1
                    ));
                    divider = false;
                }
                for message in &page.messages {
                    if divider && message.seq > read_to {
                        self.out("-- new since you last read --");
                        divider = false;
                    }
                    let line = show_line(&self.client, &self.keys, &self.encrypted, message).await;
                    self.out(line(now));
                }
                if let Some(last) = page.messages.last() {
                    self.marks.seen(&self.channel, last.seq);
                }
                page.head
            }
            Err(e) => {
                self.out(format!(
                    "cannot read #{}'s history: {}",
                    self.channel,
                    output::sanitize(&e.to_string())
                ));
                0
            }
        };
        let sub = self.client.subscribe(&self.channel, head);
        self.stream = Some(tokio::spawn(stream_loop(
            self.client.clone(),
            sub,
            self.keys.clone(),
            self.encrypted.clone(),
            self.screen.clone(),
            self.marks.clone(),
            self.typing.clone(),
        )));
    }

    async fn set_key(&mut self, passphrase: &str) {
        let said = actions::set_key(
            &self.client,
            &self.keys,
            &self.encrypted,
            &self.channel,
            passphrase,
        )
        .await;
        self.out(said);
    }

    /// Shows the last `n` messages before `before` (the newest without one).
    async fn history(&mut self, before: Option<u64>, n: u32) {
        match self.client.recent_before(&self.channel, before, n).await {
            Ok(page) => {
                if let Some(first) = page.messages.first() {
                    let oldest = self.oldest_shown.map_or(first.seq, |o| o.min(first.seq));
                    self.oldest_shown = Some(oldest);
                }
                let now = timefmt::now_ms();
                for message in &page.messages {
                    let line = show_line(&self.client, &self.keys, &self.encrypted, message).await;
                    self.out(line(now));
                }
                if page.messages.is_empty() {
                    self.out(format!("#{} has no messages yet", self.channel));
                }
            }
            Err(e) => self.out(format!(
                "cannot read history: {}",
                output::sanitize(&e.to_string())
            )),
        }
    }
}

/// Opens and checks `message` as this chat should show it; returns the line to print at a
/// given time.
async fn show_line(
    client: &Client,
    keys: &Keys,
    encrypted: &Encrypted,
    message: &WireMessage,
) -> impl Fn(u64) -> String {
    let shown = actions::open(client, keys, encrypted, message).await;
    let message = message.clone();
    move |now| output::line(&shown, &message, now)
}

async fn stream_loop(
    client: Client,
    mut sub: cellchat_client::Subscription,
    keys: Keys,
    encrypted: Encrypted,
    screen: Screen,
    marks: Marks,
    typing: Arc<Mutex<TypingBoard>>,
) {
    while let Some(next) = sub.recv().await {
        let line = match next {
            Ok(message) => {
                lock(&typing).spoke(&message.channel, &message.sender);
                // Printed is seen: the line mode shows every message of its channel.
                marks.seen(&message.channel, message.seq);
                show_line(&client, &keys, &encrypted, &message).await(timefmt::now_ms())
            }
            Err(e) => format!(
                "* stream of #{} stopped: {}",
                sub.channel(),
                output::sanitize(&e.to_string())
            ),
        };
        screen.print(line);
    }
}
