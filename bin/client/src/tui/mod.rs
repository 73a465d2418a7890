//! The full-screen client: every joined channel followed at once on the client's one push
//! connection, drawn with ratatui on crossterm. One task owns the screen and the
//! [`Model`](model::Model); subscriptions, history pages and commands run in their own tasks
//! and report back as [`Event`]s, so the screen never waits on the network. The screen is
//! redrawn after each batch of events and once a second (relative times, the status bar).

pub mod model;
pub mod view;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellchat_client::crypto;
use cellchat_client::{Client, Ephemeral, WireMessage};
use crossterm::event::{
    DisableBracketedPaste, EnableBracketedPaste, Event as TermEvent, EventStream, KeyCode,
    KeyEvent, KeyEventKind, KeyModifiers,
};
use crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use futures::StreamExt as _;
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::actions::{self, lock, Encrypted, Keys, Queued};
use crate::command::{self, Input};
use crate::marks::{Marks, MARK_DRAIN_MAX};
use crate::output;
use crate::timefmt::{self, LocalClock};
use crate::typing::TypingTeller;
use model::{Action, Model};

/// Messages read when a channel is opened.
const OPEN_HISTORY: u32 = 100;
/// Messages read per page when scrolling back.
const PAGE: u32 = 200;
/// Events handled before the screen is redrawn, so a flood cannot starve the keyboard.
const EVENTS_PER_FRAME: usize = 512;
/// Lines queued for sending before typing waits.
const SEND_QUEUE: usize = 64;
/// Longest wait at exit for queued lines to be acknowledged (the default retry budget).
const SEND_DRAIN_MAX: Duration = Duration::from_secs(30);
/// Largest input history file read at start.
const HISTORY_FILE_MAX: u64 = 4 << 20;
/// Channels listed, most; joins past it are refused so the client stays responsive.
const CHANNELS_MAX: usize = 10_000;
/// History reads of newly opened channels in flight at once, so reopening thousands of
/// channels at start does not send thousands of reads to a node at once.
const OPENING_AT_ONCE: usize = 8;
/// How often the read markers are read back. Nodes push a marker as it moves, so this only
/// catches what a push connection missed (down during a failover, a snapshot installed).
const MARKERS_EVERY: Duration = Duration::from_secs(60);

/// What the tasks tell the screen.
enum Event {
    /// A new message of a followed channel.
    Message(String, model::Shown),
    /// A page of older messages, oldest first.
    Older {
        channel: String,
        messages: Vec<model::Shown>,
        at_start: bool,
    },
    /// Lines to show in a channel (the one shown when `None`).
    Say(Option<String>, Vec<String>),
    /// This user is a member of the channel now: open it.
    Accepted(String),
    /// This user's read marker in a channel, as the cluster holds it.
    Marker(String, u64),
    /// Presence or typing.
    Ephemeral(Ephemeral),
}

/// Where the full-screen client keeps its files, and where its logs go.
#[derive(Debug, Clone)]
pub struct Files {
    /// Input history, one JSON string per line (never `/key` lines).
    pub history: PathBuf,
    /// The channels in the list, reopened at the next start.
    pub channels: PathBuf,
    /// The muted channels.
    pub muted: PathBuf,
    /// Where logs go (shown in the help).
    pub log: PathBuf,
}

impl Files {
    /// Under `config_dir`: `history/<cluster>/<name>` and `<name>.channels`.
    pub fn under(config_dir: &Path, cluster: &str, name: &str, log: PathBuf) -> Files {
        let dir = config_dir.join("history").join(cluster);
        Files {
            history: dir.join(name),
            channels: dir.join(format!("{name}.channels")),
            muted: dir.join(format!("{name}.muted")),
            log,
        }
    }
}

/// Whether the full-screen client can run here: stdin and stdout are terminals and `TERM`
/// is not `dumb`.
pub fn usable() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdin().is_terminal()
        && std::io::stdout().is_terminal()
        && std::env::var("TERM").map_or(true, |term| term != "dumb")
}

/// Puts the terminal back as it was when dropped, also on a panic.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> std::io::Result<TerminalGuard> {
        enable_raw_mode()?;
        let guard = TerminalGuard;
        crossterm::execute!(
            std::io::stdout(),
            EnterAlternateScreen,
            EnableBracketedPaste
        )?;
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        Ok(guard)
    }
}

fn restore() {
    // Best effort: the terminal may be gone already.
    let _ = crossterm::execute!(
        std::io::stdout(),
        DisableBracketedPaste,
        LeaveAlternateScreen,
        crossterm::cursor::Show
    );
    let _ = disable_raw_mode();
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

struct App {
    client: Client,
    model: Model,
    keys: Keys,
    encrypted: Encrypted,
    /// Each followed channel's task.
    follows: HashMap<String, JoinHandle<()>>,
    /// Channels with a history page on its way.
    paging: HashSet<String>,
    /// Permits for [`OPENING_AT_ONCE`].
    opening: Arc<tokio::sync::Semaphore>,
    events: mpsc::Sender<Event>,
    send_tx: mpsc::Sender<Queued>,
    files: Files,
    /// Ring the bell after the next frame.
    bell: bool,
    /// Rows of the message area, for PgUp and PgDn.
    page_rows: usize,
    /// What this user has read, for the read markers.
    marks: Marks,
    /// Tells the cluster when this user types.
    typing: TypingTeller,
}

/// Runs the full-screen chat until `/quit`, Ctrl-D or a second Ctrl-C.
///
/// # Errors
///
/// The terminal cannot be set up or drawn on.
pub async fn run(
    client: Client,
    channel: String,
    keys: Option<crypto::Keys>,
    files: Files,
) -> anyhow::Result<()> {
    let me = client.name().unwrap_or("?").to_owned();
    let (events, mut incoming) = mpsc::channel(4 * EVENTS_PER_FRAME);
    let (send_tx, send_rx) = mpsc::channel(SEND_QUEUE);
    let say = |events: mpsc::Sender<Event>| {
        move |line: String| {
            // The screen is gone when this fails: nobody to tell.
            let _ = events.try_send(Event::Say(None, vec![line]));
        }
    };
    let sender = tokio::spawn(actions::send_loop(
        client.clone(),
        send_rx,
        say(events.clone()),
    ));
    tokio::spawn(actions::event_loop(client.clone(), say(events.clone())));
    let (marks, marker) = Marks::start(client.clone());
    let mut app = App {
        model: Model::new(&me, &channel),
        client,
        keys: Arc::new(Mutex::new(HashMap::new())),
        encrypted: Arc::new(Mutex::new(HashSet::new())),
        follows: HashMap::new(),
        paging: HashSet::new(),
        opening: Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE)),
        events,
        send_tx,
        files,
        bell: false,
        page_rows: 20,
        marks,
        typing: TypingTeller::default(),
    };
    tokio::spawn(forward_ephemeral(app.client.clone(), app.events.clone()));
    if let Some(keys) = keys {
        lock(&app.keys).insert(channel.clone(), keys);
        lock(&app.encrypted).insert(channel.clone());
    }
    app.model.input.history = load_history(&app.files.history);
    for saved in load_channels(&app.files.channels) {
        if saved != channel {
            app.model.open(&saved);
            app.follow(&saved);
        }
    }
    app.model.open(&channel);
    app.follow(&channel);
    for muted in load_channels(&app.files.muted) {
        app.model.mute(&muted, true);
    }
    app.model.notice(
        timefmt::now_ms(),
        &format!(
            "connected to cluster {:?} as {me}; /help for commands and keys",
            app.client.cluster_name()
        ),
    );

    let guard = TerminalGuard::enter()?;
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let clock = LocalClock::system();
    let mut keyboard = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut markers = tokio::time::interval(MARKERS_EVERY);
    markers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quit = false;
    while !quit {
        tokio::select! {
            key = keyboard.next() => match key {
                Some(Ok(event)) => quit = app.on_terminal(event),
                // The terminal is gone: nothing more can be typed or shown.
                Some(Err(_)) | None => quit = true,
            },
            Some(event) = incoming.recv() => app.on_event(event),
            _ = tick.tick() => {}
            _ = markers.tick() => app.read_markers(),
        }
        for _ in 0..EVENTS_PER_FRAME {
            match incoming.try_recv() {
                Ok(event) => app.on_event(event),
                Err(_) => break,
            }
        }
        if let Some((channel, seq)) = app.model.reading() {
            app.marks.seen(&channel, seq);
        }
        let status = app.status();
        let mut rows = 0;
        terminal.draw(|frame| {
            view::draw(frame, &app.model, &status, timefmt::now_ms(), &clock);
            rows = frame.area().height.saturating_sub(4);
        })?;
        app.page_rows = usize::from(rows).max(1);
        if std::mem::take(&mut app.bell) {
            let mut out = std::io::stdout();
            // The bell is a courtesy: a terminal that cannot take it still shows the mention.
            let _ = out.write_all(b"\x07").and_then(|()| out.flush());
        }
    }
    drop(terminal);
    drop(guard);
    for follow in app.follows.values() {
        follow.abort();
    }
    // Lines typed before quitting are still sent, bounded by the client's retry budget.
    let App { send_tx, marks, .. } = app;
    drop(send_tx);
    marks.close();
    if tokio::time::timeout(SEND_DRAIN_MAX, sender).await.is_err() {
        println!("some lines were not acknowledged in time and may not have been sent");
    }
    // A marker left behind only shows some messages as new again next time.
    let _ = tokio::time::timeout(MARK_DRAIN_MAX, marker).await;
    Ok(())
}

impl App {
    /// A key, a paste or a resize; `true` to quit.
    fn on_terminal(&mut self, event: TermEvent) -> bool {
        let action = match event {
            TermEvent::Key(key) if key.kind != KeyEventKind::Release => self.on_key(key),
            TermEvent::Paste(text) => {
                self.typed();
                self.model.paste(&text)
            }
            // A resize is drawn by the frame that follows every event.
            _ => Action::None,
        };
        self.act(action)
    }

    fn on_key(&mut self, key: KeyEvent) -> Action {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        match key.code {
            KeyCode::Char('c') if ctrl => return self.model.interrupt(timefmt::now_ms()),
            KeyCode::Char('d') if ctrl => return Action::Quit,
            KeyCode::Char('n') if ctrl => self.model.cycle(true),
            KeyCode::Char('p') if ctrl => self.model.cycle(false),
            KeyCode::Right if alt => self.model.cycle(true),
            KeyCode::Left if alt => self.model.cycle(false),
            _ if self.model.input.edit(&key) => self.typed(),
            KeyCode::Enter => return self.model.submit(),
            KeyCode::Up => self.model.input.recall(true),
            KeyCode::Down => self.model.input.recall(false),
            KeyCode::Tab => {
                let candidates = self.model.completions();
                self.model.input.complete(&candidates);
            }
            KeyCode::Esc if self.model.asking.is_some() => {
                return self.model.interrupt(timefmt::now_ms());
            }
            KeyCode::PageUp => return self.model.scroll(true, self.page_rows, self.page_rows),
            KeyCode::PageDown => return self.model.scroll(false, self.page_rows, self.page_rows),
            // Home and End move in the input while there is some; otherwise (or with Ctrl)
            // they go to the top and the bottom of the scrollback.
            KeyCode::Home if ctrl || self.model.input.text.is_empty() => {
                return self.model.scroll_to(true, self.page_rows);
            }
            KeyCode::End if ctrl || self.model.input.text.is_empty() => {
                return self.model.scroll_to(false, self.page_rows);
            }
            KeyCode::Home => self.model.input.home_end(false),
            KeyCode::End => self.model.input.home_end(true),
            _ => {}
        }
        Action::None
    }

    /// The input changed: tell the shown channel this user types there, at most every
    /// [`TYPING_RENEW_MS`](proto::push::TYPING_RENEW_MS). Not for commands or secrets, and not
    /// once the line is empty again.
    fn typed(&mut self) {
        if self.model.asking.is_none() {
            let (channel, text) = (&self.model.current, &self.model.input.text);
            self.typing
                .typed(&self.client, channel, text, timefmt::now_ms());
        }
    }

    /// Does what the model asked; `true` to quit.
    fn act(&mut self, action: Action) -> bool {
        match action {
            Action::None => {}
            Action::Bell => self.bell = true,
            Action::Quit => return true,
            Action::PageBack { channel, before } => self.page_back(&channel, before, PAGE),
            Action::Secret(passphrase) => {
                let channel = self.model.current.clone();
                self.spawn_say(Some(channel.clone()), {
                    let (client, keys, encrypted) = self.shared();
                    async move {
                        vec![
                            actions::set_key(&client, &keys, &encrypted, &channel, &passphrase)
                                .await,
                        ]
                    }
                });
            }
            Action::Submit(line) => {
                self.typing.entered(&self.model.current);
                if let Err(e) = append_history(&self.files.history, &line) {
                    tracing::warn!("input history not saved: {e}");
                }
                return self.submit(&line);
            }
        }
        false
    }

    fn shared(&self) -> (Client, Keys, Encrypted) {
        (
            self.client.clone(),
            self.keys.clone(),
            self.encrypted.clone(),
        )
    }

    fn say(&mut self, text: &str) {
        self.model.notice(timefmt::now_ms(), text);
    }

    /// Runs `task` on its own and shows the lines it returns in `channel`.
    fn spawn_say(
        &self,
        channel: Option<String>,
        task: impl std::future::Future<Output = Vec<String>> + Send + 'static,
    ) {
        let events = self.events.clone();
        tokio::spawn(async move {
            let lines = task.await;
            let _ = events.send(Event::Say(channel, lines)).await;
        });
    }

    /// An entered line: a message to send or a command. `true` to quit.
    fn submit(&mut self, line: &str) -> bool {
        let input = match command::parse(line) {
            Ok(input) => input,
            Err(message) => {
                self.say(&message);
                return false;
            }
        };
        let channel = self.model.current.clone();
        let (client, keys, encrypted) = self.shared();
        let here = Some(channel.clone());
        match input {
            Input::Message(text) => match actions::send_key(&keys, &encrypted, &channel) {
                Ok(key) => self.queue(channel, text, key),
                Err(refusal) => self.say(&refusal),
            },
            Input::Plain(text) => self.queue(channel, text, None),
            Input::Relate { relation, text } => {
                match actions::relation_key(&keys, &encrypted, &channel, &relation) {
                    Ok(key) => self.queue_related(channel, text, key, Some(relation)),
                    Err(refusal) => self.say(&refusal),
                }
            }
            Input::Search(query) => self.spawn_say(here, async move {
                actions::search(&client, &keys, &encrypted, &channel, &query).await
            }),
            Input::Thread(seq) => self.spawn_say(here, async move {
                actions::thread(&client, &keys, &encrypted, &channel, seq).await
            }),
            Input::Join(name) => self.join(&name),
            Input::Direct(with) => {
                let events = self.events.clone();
                tokio::spawn(async move {
                    match actions::open_direct(&client, &keys, &encrypted, &with).await {
                        Ok((channel, line)) => {
                            let _ = events.send(Event::Accepted(channel.clone())).await;
                            let _ = events.send(Event::Say(Some(channel), vec![line])).await;
                        }
                        Err(refusal) => {
                            let _ = events.send(Event::Say(here, vec![refusal])).await;
                        }
                    }
                });
            }
            Input::Leave => {
                if self.model.close(&channel) {
                    if let Some(follow) = self.follows.remove(&channel) {
                        follow.abort();
                    }
                    self.save_channels();
                    self.say(&format!("left #{channel}"));
                } else {
                    self.say(&format!(
                        "#{channel} is your only channel: /join another, or /quit"
                    ));
                }
            }
            Input::History(n) | Input::More(n) => match self.model.shown().oldest_seq {
                Some(oldest) if oldest > 1 && !self.model.shown().at_start => {
                    self.page_back(&channel, oldest, n);
                }
                _ => self.say(&format!("that is the start of #{channel}")),
            },
            Input::Channels => {
                self.spawn_say(
                    here,
                    async move { actions::channels(&client, &channel).await },
                )
            }
            Input::Who => {
                self.spawn_say(here, async move { actions::who(&client, &channel).await })
            }
            Input::Servers => self.spawn_say(here, async move {
                vec![output::servers_table(&client.servers().await)]
            }),
            Input::KeyPrompt => self.model.ask(format!("passphrase for #{channel}: ")),
            Input::Key(passphrase) => {
                self.act(Action::Secret(passphrase));
            }
            Input::KeyClear => {
                lock(&keys).remove(&channel);
                self.say(&format!(
                    "#{channel}: passphrase forgotten; new messages are sent in the clear"
                ));
            }
            Input::Create {
                channel: name,
                private,
            } => self.spawn_say(here, async move {
                vec![actions::create(&client, &name, private).await]
            }),
            Input::Invite(user) => self.spawn_say(here, async move {
                vec![actions::invite(&client, &channel, &user).await]
            }),
            Input::Accept(name) => {
                let events = self.events.clone();
                tokio::spawn(async move {
                    let event = match actions::accept(&client, &name).await {
                        Ok(joined) => {
                            let _ = events.send(Event::Say(here, vec![joined])).await;
                            Event::Accepted(name)
                        }
                        Err(refusal) => Event::Say(here, vec![refusal]),
                    };
                    let _ = events.send(event).await;
                });
            }
            Input::Remove(user) => self.spawn_say(here, async move {
                vec![actions::remove(&client, &channel, &user).await]
            }),
            Input::Members => {
                self.spawn_say(
                    here,
                    async move { actions::members(&client, &channel).await },
                )
            }
            Input::RetentionShow => {
                self.spawn_say(
                    here,
                    async move { actions::retention(&client, &channel).await },
                )
            }
            Input::RetentionSet(retention) => self.spawn_say(here, async move {
                actions::set_retention(&client, &channel, retention).await
            }),
            Input::TopicShow => {
                self.spawn_say(here, async move { actions::topic(&client, &channel).await })
            }
            Input::TopicSet(topic) => self.spawn_say(here, async move {
                actions::set_topic(&client, &channel, topic).await
            }),
            Input::Mute(muted) => {
                self.model.mute(&channel, muted);
                if let Err(e) = save_channels(&self.files.muted, &self.model.muted()) {
                    tracing::warn!("muted channels not saved: {e}");
                }
                self.say(&if muted {
                    format!("#{channel} muted: counted, drawn dim, no bell; /unmute undoes it")
                } else {
                    format!("#{channel} unmuted")
                });
            }
            Input::Help => {
                let help = format!(
                    "{}\n{KEYS}\nlogs go to {}",
                    command::HELP,
                    self.files.log.display()
                );
                self.say(&help);
            }
            Input::Quit => return true,
        }
        false
    }

    fn queue(&mut self, channel: String, text: String, key: Option<crypto::ChannelKeyV2>) {
        self.queue_related(channel, text, key, None);
    }

    fn queue_related(
        &mut self,
        channel: String,
        text: String,
        key: Option<crypto::ChannelKeyV2>,
        relation: Option<proto::Relation>,
    ) {
        match self.send_tx.try_send((channel, text, key, relation)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.say(&format!(
                "{SEND_QUEUE} lines are waiting to be sent: this one was not queued; try again"
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.say("the sender stopped: restart the client");
            }
        }
    }

    /// Shows `channel`, following it from now on if it was not followed yet.
    fn join(&mut self, channel: &str) {
        if !self.model.channels.contains_key(channel) && self.model.order.len() >= CHANNELS_MAX {
            self.say(&format!(
                "{CHANNELS_MAX} channels are open: /leave one before joining another"
            ));
            return;
        }
        self.model.open(channel);
        self.follow(channel);
        self.save_channels();
    }

    /// Starts following `channel` (once): its recent history, then every new message.
    fn follow(&mut self, channel: &str) {
        if self.follows.contains_key(channel) {
            return;
        }
        let (client, keys, encrypted) = self.shared();
        let events = self.events.clone();
        let name = channel.to_owned();
        let opening = self.opening.clone();
        let task = tokio::spawn(async move {
            // The semaphore is never closed; without a permit the read just goes ahead.
            let permit = opening.acquire_owned().await.ok();
            if let Some(notice) = actions::security_notice(&client, &keys, &encrypted, &name).await
            {
                let _ = events
                    .send(Event::Say(Some(name.clone()), vec![notice]))
                    .await;
            }
            if let Some(notice) = actions::topic_notice(&client, &name).await {
                let _ = events
                    .send(Event::Say(Some(name.clone()), vec![notice]))
                    .await;
            }
            // Before the history, so its first page counts what is new since the marker.
            if let Ok(detail) = client.channel_info(&name).await {
                let _ = events
                    .send(Event::Marker(name.clone(), detail.info.read_to))
                    .await;
            }
            let head = match client.history(&name, None, OPEN_HISTORY).await {
                Ok(page) => {
                    let at_start = page.messages.first().is_none_or(|m| m.seq <= page.floor);
                    let messages = shown_all(&client, &keys, &encrypted, &page.messages).await;
                    let event = Event::Older {
                        channel: name.clone(),
                        messages,
                        at_start,
                    };
                    let _ = events.send(event).await;
                    page.head
                }
                Err(e) => {
                    let line = format!(
                        "cannot read #{name}'s history: {}",
                        output::sanitize(&e.to_string())
                    );
                    let _ = events
                        .send(Event::Say(Some(name.clone()), vec![line]))
                        .await;
                    0
                }
            };
            drop(permit);
            let mut sub = client.subscribe(&name, head);
            while let Some(next) = sub.recv().await {
                let event = match next {
                    Ok(message) => Event::Message(
                        name.clone(),
                        shown(&client, &keys, &encrypted, &message).await,
                    ),
                    Err(e) => Event::Say(
                        Some(name.clone()),
                        vec![format!(
                            "* stream of #{name} stopped: {}",
                            output::sanitize(&e.to_string())
                        )],
                    ),
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
        });
        self.follows.insert(channel.to_owned(), task);
    }

    /// Asks for the `count` messages of `channel` before `before` (once at a time).
    fn page_back(&mut self, channel: &str, before: u64, count: u32) {
        if !self.paging.insert(channel.to_owned()) {
            return;
        }
        let (client, keys, encrypted) = self.shared();
        let events = self.events.clone();
        let name = channel.to_owned();
        tokio::spawn(async move {
            let event = match client.recent_before(&name, Some(before), count).await {
                Ok(page) => {
                    let at_start = page
                        .messages
                        .first()
                        .is_none_or(|m| m.seq <= page.floor.max(1));
                    Event::Older {
                        messages: shown_all(&client, &keys, &encrypted, &page.messages).await,
                        channel: name,
                        at_start,
                    }
                }
                Err(e) => Event::Say(
                    Some(name.clone()),
                    vec![format!(
                        "cannot read older messages of #{name}: {}",
                        output::sanitize(&e.to_string())
                    )],
                ),
            };
            let _ = events.send(event).await;
        });
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Message(channel, message) => {
                if self.model.channels.contains_key(&channel) {
                    let action = self.model.on_message(&channel, message);
                    self.act(action);
                }
            }
            Event::Older {
                channel,
                messages,
                at_start,
            } => {
                self.paging.remove(&channel);
                self.model.on_older(&channel, messages, at_start);
            }
            Event::Say(channel, lines) => {
                let channel = channel.unwrap_or_else(|| self.model.current.clone());
                let now = timefmt::now_ms();
                for line in lines {
                    self.model.notice_in(&channel, now, &line);
                }
            }
            Event::Accepted(channel) => self.join(&channel),
            Event::Marker(channel, seq) => {
                self.marks.known(&channel, seq);
                self.model.on_marker(&channel, seq);
            }
            Event::Ephemeral(Ephemeral::Typing { channel, user }) => {
                let until = timefmt::now_ms() + proto::push::TYPING_SHOW_MS;
                self.model.on_typing(&channel, &user, until);
            }
            Event::Ephemeral(Ephemeral::Marker { channel, read_to }) => {
                self.on_event(Event::Marker(channel, read_to));
            }
            Event::Ephemeral(Ephemeral::Presence {
                online,
                offline,
                full,
            }) => self.model.on_presence(online, &offline, full),
            Event::Ephemeral(Ephemeral::Added { channel }) => self.added(channel),
        }
    }

    /// Someone started a direct conversation with this user (listed and followed at once, not
    /// shown) or invited them to a private channel (said).
    fn added(&mut self, channel: String) {
        if self.model.channels.contains_key(&channel) {
            return;
        }
        if !proto::is_direct_channel(&channel) {
            let name = crate::output::sanitize(&channel);
            self.say(&format!(
                "you are invited to #{name}: /accept #{name} joins it"
            ));
        } else if self.model.order.len() < CHANNELS_MAX {
            self.model.add(&channel);
            self.follow(&channel);
            self.save_channels();
        } else {
            self.say(&format!(
                "someone started a direct conversation with you, but {CHANNELS_MAX} channels are \
                 open: /leave one, then /channels lists it"
            ));
        }
    }

    /// Reads this user's markers back in the background (see [`MARKERS_EVERY`]), and lists
    /// the direct conversations with something unread that are not in the list (started while
    /// this client was away, or missed).
    fn read_markers(&self) {
        let (client, events) = (self.client.clone(), self.events.clone());
        tokio::spawn(async move {
            // A failed read changes nothing: the next one comes soon.
            let Ok(channels) = client.channels().await else {
                return;
            };
            let unread_direct = (channels.iter())
                .filter(|c| !c.direct.is_empty() && c.head > c.read_to)
                .map(|c| {
                    Event::Ephemeral(Ephemeral::Added {
                        channel: c.name.clone(),
                    })
                })
                .collect::<Vec<_>>();
            for event in unread_direct {
                if events.send(event).await.is_err() {
                    return;
                }
            }
            for channel in channels.into_iter().filter(|c| c.read_to > 0) {
                if events
                    .send(Event::Marker(channel.name, channel.read_to))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }

    fn status(&mut self) -> view::Status {
        let status = self.client.status();
        // A node is shown by name; by id only until its announcement has been heard.
        let label = |id: u64, name: &Option<String>| {
            name.as_deref()
                .map_or_else(|| format!("n{id}"), output::sanitize)
        };
        let reading = match (status.reading, status.reading_rtt_ms) {
            (Some(id), Some(rtt)) => format!("{} {rtt:.1}ms", label(id, &status.reading_name)),
            (Some(id), None) => label(id, &status.reading_name),
            (None, _) => "-".to_owned(),
        };
        let leader = status
            .leader
            .map_or_else(|| "-".to_owned(), |id| label(id, &status.leader_name));
        let connection = match (status.reading, status.leader) {
            (None, _) => "connecting",
            (Some(_), None) => "no leader: sends wait",
            (Some(_), Some(_)) => "connected",
        };
        let current = &self.model.current;
        let security = if lock(&self.keys).contains_key(current) {
            "e2e"
        } else if lock(&self.encrypted).contains(current) {
            "e2e, no key: /key"
        } else {
            "plain"
        };
        let typing = self.model.typing_in(&current.clone(), timefmt::now_ms());
        view::Status {
            reading,
            leader,
            connection: connection.to_owned(),
            security: security.to_owned(),
            typing: output::typing_text(&typing),
            online: self.model.online.as_ref().map(BTreeSet::len),
        }
    }

    fn save_channels(&self) {
        if let Err(e) = save_channels(&self.files.channels, &self.model.order) {
            tracing::warn!("channel list not saved: {e}");
        }
    }
}

/// Hands the client's presence and typing events to the screen until it is gone. A listener
/// that fell behind only misses some; presence catches up with the next full list.
async fn forward_ephemeral(client: Client, events: mpsc::Sender<Event>) {
    let mut heard = client.ephemeral();
    loop {
        match heard.recv().await {
            Ok(event) => {
                if events.send(Event::Ephemeral(event)).await.is_err() {
                    return;
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Keys of the full-screen client, for `/help`.
const KEYS: &str = "\
keys:
  Enter send    Alt-Enter new line    Tab complete    Up/Down earlier input
  PgUp/PgDn scroll (older messages are fetched)    Home/End (Ctrl-Home/End) top, bottom
  Ctrl-N/Ctrl-P (Alt-Right/Left) next/previous channel    Ctrl-U clear    Ctrl-W delete word
  Ctrl-C clear the line; twice, or Ctrl-D, quits";

/// A message as the screen shows it.
async fn shown(
    client: &Client,
    keys: &Keys,
    encrypted: &Encrypted,
    message: &WireMessage,
) -> model::Shown {
    let opened = actions::open(client, keys, encrypted, message).await;
    let text = if message.deleted {
        "[deleted]".to_owned()
    } else {
        output::sanitize_lines(&opened.opened.content().display())
    };
    model::Shown {
        seq: message.seq,
        sender: output::sanitize(&message.sender),
        text,
        at_ms: message.at_ms,
        markers: output::markers(&opened)
            .into_iter()
            .map(str::to_owned)
            .collect(),
        mentions_me: false,
        relation: message.relation.clone(),
        edited: message.edits > 0 && !message.deleted,
        deleted: message.deleted,
        reactions: message
            .reactions
            .iter()
            .map(|r| (r.emoji.clone(), r.users.clone()))
            .collect(),
        replies: message.replies,
    }
}

async fn shown_all(
    client: &Client,
    keys: &Keys,
    encrypted: &Encrypted,
    messages: &[WireMessage],
) -> Vec<model::Shown> {
    let mut out = Vec::with_capacity(messages.len());
    for message in messages {
        out.push(shown(client, keys, encrypted, message).await);
    }
    out
}

/// Creates `path`'s directory private to this user.
fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    match path.parent() {
        Some(dir) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        None => Ok(()),
    }
}

/// The saved input history, newest last, at most [`model::HISTORY_MAX`] lines. A missing or
/// unreadable file is an empty history; a line that is not a JSON string is skipped.
fn load_history(path: &Path) -> Vec<String> {
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut text = String::new();
    if std::io::Read::read_to_string(&mut std::io::Read::take(file, HISTORY_FILE_MAX), &mut text)
        .is_err()
    {
        return Vec::new();
    }
    let mut lines: Vec<String> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<String>(line).ok())
        .filter(|line| !command::may_hold_a_secret(line))
        .collect();
    let extra = lines.len().saturating_sub(model::HISTORY_MAX);
    lines.drain(..extra);
    lines
}

/// Adds `line` to the saved history (mode 0600), unless it may hold a secret. The file is
/// cut back to [`model::HISTORY_MAX`] lines once it holds twice as many.
fn append_history(path: &Path, line: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if line.trim().is_empty() || command::may_hold_a_secret(line) {
        return Ok(());
    }
    private_dir(path)?;
    let json = serde_json::to_string(line).map_err(std::io::Error::other)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    writeln!(file, "{json}")?;
    let held = std::fs::read_to_string(path)?.lines().count();
    if held > 2 * model::HISTORY_MAX {
        let keep = load_history(path);
        let mut text = String::new();
        for line in keep {
            text.push_str(&serde_json::to_string(&line).map_err(std::io::Error::other)?);
            text.push('\n');
        }
        write_private(path, text.as_bytes())?;
    }
    Ok(())
}

/// Replaces `path` with `bytes` through a private temporary file, so a crash leaves the old
/// file or the new one.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    private_dir(path)?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The channels saved by the last session, valid names only.
fn load_channels(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    serde_json::from_str::<Vec<String>>(&text)
        .unwrap_or_default()
        .into_iter()
        .filter(|name| command::parse_channel(name).as_deref() == Ok(name.as_str()))
        .take(CHANNELS_MAX)
        .collect()
}

fn save_channels(path: &Path, channels: &[String]) -> std::io::Result<()> {
    let json = serde_json::to_vec(channels).map_err(std::io::Error::other)?;
    write_private(path, &json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_input_history_is_private_survives_restarts_and_never_holds_a_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("history").join("c").join("alice");
        for line in ["one", "/key hunter2", "two\nlines", ""] {
            append_history(&path, line).expect("append");
        }
        assert_eq!(load_history(&path), ["one", "two\nlines"]);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        for i in 0..(2 * model::HISTORY_MAX + 1) {
            append_history(&path, &format!("l{i}")).expect("append");
        }
        let kept = load_history(&path);
        assert_eq!(kept.len(), model::HISTORY_MAX);
        assert_eq!(kept.last().map(String::as_str), Some("l2000"));
        let held = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .count();
        assert!(held <= 2 * model::HISTORY_MAX, "{held}");
    }

    #[test]
    fn saved_channels_come_back_and_bad_names_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("alice.channels");
        save_channels(&path, &["general".into(), "ops".into()]).expect("save");
        assert_eq!(load_channels(&path), ["general", "ops"]);
        std::fs::write(&path, r#"["ok", "bad name", "\u001b[2J"]"#).expect("write");
        assert_eq!(load_channels(&path), ["ok"]);
        std::fs::write(&path, "not json").expect("write");
        assert!(load_channels(&path).is_empty());
    }
}
