//! The interactive chat: a rustyline editor on its own thread, incoming lines printed above the
//! input through rustyline's `ExternalPrinter` (so a half-typed line survives), and commands
//! handled on the async side.

use std::collections::{HashMap, HashSet};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};

use cellchat_client::crypto;
use cellchat_client::{Client, WireMessage};
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::{CmdKind, Highlighter};
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{ColorMode, Config, Editor, ExternalPrinter, Helper};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::actions::{self, lock, Encrypted, Keys, Queued};
use crate::command::{self, Input};
use crate::{output, timefmt};

/// Messages shown when joining a channel.
const JOIN_HISTORY: u32 = 50;
/// Longest wait at exit for queued lines to be acknowledged (the default retry budget).
const SEND_DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// Lines queued for sending before the prompt waits.
const SEND_QUEUE: usize = 64;

/// Prints a line above the input; shared by the stream, sender and event tasks.
type Printer = Arc<Mutex<PrintFn>>;
type PrintFn = Box<dyn FnMut(String) + Send>;

fn print(printer: &Printer, line: String) {
    let mut print = printer
        .lock()
        .expect("printer lock is never poisoned: print does not panic");
    print(line);
}

/// What the editor thread sends to the async side.
enum FromEditor {
    Line(String),
    Secret(String),
    /// Ctrl-D, Ctrl-C, or a terminal error.
    Quit,
    /// The line was not valid UTF-8 or could not be read; say so and go on.
    Unreadable(String),
}

/// What the async side tells the editor thread to do next.
enum ToEditor {
    Prompt(String),
    AskSecret(String),
    Quit,
}

/// Masks what is typed while reading a passphrase (the rustyline `read_password` example).
struct Masking {
    on: bool,
}

impl Highlighter for Masking {
    fn highlight<'l>(&self, line: &'l str, _pos: usize) -> std::borrow::Cow<'l, str> {
        if self.on {
            std::borrow::Cow::Owned("*".repeat(line.chars().count()))
        } else {
            std::borrow::Cow::Borrowed(line)
        }
    }

    fn highlight_char(&self, _line: &str, _pos: usize, kind: CmdKind) -> bool {
        self.on && kind != CmdKind::MoveCursor
    }
}

impl Completer for Masking {
    type Candidate = String;
}

impl Hinter for Masking {
    type Hint = String;
}

impl Validator for Masking {}

impl Helper for Masking {}

/// Runs the editor; hands its external printer back through `printer_tx` first.
fn editor_thread(
    printer_tx: std_mpsc::Sender<Option<PrintFn>>,
    to_async: mpsc::Sender<FromEditor>,
    from_async: std_mpsc::Receiver<ToEditor>,
) {
    let config = Config::builder()
        .auto_add_history(false)
        .color_mode(ColorMode::Forced)
        .build();
    let mut editor = match Editor::<Masking, DefaultHistory>::with_config(config) {
        Ok(editor) => editor,
        Err(e) => {
            // The async side sees the closed channels and stops.
            let _ = printer_tx.send(None);
            let _ = to_async.blocking_send(FromEditor::Unreadable(format!("no terminal: {e}")));
            return;
        }
    };
    editor.set_helper(Some(Masking { on: false }));
    let printer: Option<PrintFn> = match editor.create_external_printer() {
        Ok(mut p) => Some(Box::new(move |line: String| {
            // Outside raw mode rustyline writes the text as is, so the newline must be ours;
            // inside it, a trailing newline stops rustyline from adding another.
            // A failed print means the terminal is gone; the next readline reports it.
            let _ = p.print(format!("{line}\n"));
        })),
        Err(_) => None,
    };
    if printer_tx.send(printer).is_err() {
        return;
    }
    while let Ok(next) = from_async.recv() {
        let (prompt, secret) = match next {
            ToEditor::Prompt(p) => (p, false),
            ToEditor::AskSecret(p) => (p, true),
            ToEditor::Quit => return,
        };
        if let Some(helper) = editor.helper_mut() {
            helper.on = secret;
        }
        let event = match editor.readline(&prompt) {
            Ok(line) if secret => FromEditor::Secret(line),
            Ok(line) => {
                // History is in memory only; a failure to add is harmless. A `/key` line may
                // hold a passphrase, which must not be recalled by the arrow keys.
                if !command::may_hold_a_secret(&line) {
                    let _ = editor.add_history_entry(line.as_str());
                }
                FromEditor::Line(line)
            }
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => FromEditor::Quit,
            Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                FromEditor::Unreadable("input is not valid UTF-8: nothing sent".into())
            }
            Err(e) => FromEditor::Unreadable(format!("cannot read input: {e}")),
        };
        let quit = matches!(event, FromEditor::Quit);
        if to_async.blocking_send(event).is_err() || quit {
            return;
        }
    }
}

struct Chat {
    client: Client,
    channel: String,
    previous: Vec<String>,
    keys: Keys,
    encrypted: Encrypted,
    /// The seq of the oldest message of this channel shown so far, where `/more` pages on.
    oldest_shown: Option<u64>,
    printer: Printer,
    stream: Option<JoinHandle<()>>,
    send_tx: mpsc::Sender<Queued>,
}

/// Asks for a secret on the terminal without echoing it (each typed character shows as `*`),
/// and never adds it to any input history. `None` at end of input or without a terminal.
pub fn ask_secret(prompt: &str) -> Option<String> {
    let config = Config::builder().auto_add_history(false).build();
    let mut editor = Editor::<Masking, DefaultHistory>::with_config(config).ok()?;
    editor.set_helper(Some(Masking { on: true }));
    editor.readline(prompt).ok()
}

/// Runs the chat until `/quit` or end of input.
///
/// # Errors
///
/// The terminal cannot be used, or the first history read fails.
pub async fn run(
    client: Client,
    channel: String,
    keys: Option<crypto::Keys>,
) -> anyhow::Result<()> {
    let (printer_tx, printer_rx) = std_mpsc::channel();
    let (to_async, mut from_editor) = mpsc::channel(1);
    let (to_editor, from_async) = std_mpsc::channel();
    let editor = std::thread::spawn(move || editor_thread(printer_tx, to_async, from_async));
    let external = printer_rx.recv().ok().flatten();
    let printer: Printer = Arc::new(Mutex::new(
        external.unwrap_or_else(|| Box::new(|line: String| println!("{line}"))),
    ));
    let channel_keys: Keys = Arc::new(Mutex::new(HashMap::new()));
    if let Some(keys) = keys {
        lock(&channel_keys).insert(channel.clone(), keys);
    }
    let keys = channel_keys;
    let (send_tx, send_rx) = mpsc::channel(SEND_QUEUE);
    let say = |printer: Printer| move |line: String| print(&printer, line);
    let sender = tokio::spawn(actions::send_loop(
        client.clone(),
        send_rx,
        say(printer.clone()),
    ));
    tokio::spawn(actions::event_loop(client.clone(), say(printer.clone())));
    let mut chat = Chat {
        client,
        channel,
        previous: Vec::new(),
        keys,
        encrypted: Arc::new(Mutex::new(HashSet::new())),
        oldest_shown: None,
        printer,
        stream: None,
        send_tx,
    };
    println!(
        "connected to cluster {:?} as {}; type /help for commands",
        chat.client.cluster_name(),
        chat.client.name().unwrap_or("?")
    );
    chat.enter(chat.channel.clone()).await;
    let mut next = ToEditor::Prompt(chat.prompt());
    loop {
        if to_editor.send(next).is_err() {
            break;
        }
        let Some(event) = from_editor.recv().await else {
            break;
        };
        next = match event {
            FromEditor::Line(line) => chat.handle_line(&line).await,
            FromEditor::Secret(passphrase) => {
                chat.set_key(&passphrase).await;
                ToEditor::Prompt(chat.prompt())
            }
            FromEditor::Unreadable(message) => {
                println!("{message}");
                ToEditor::Prompt(chat.prompt())
            }
            FromEditor::Quit => ToEditor::Quit,
        };
        if matches!(next, ToEditor::Quit) {
            // The editor thread may have ended already (Ctrl-D); nothing to tell it then.
            let _ = to_editor.send(ToEditor::Quit);
            break;
        }
    }
    if let Some(stream) = chat.stream.take() {
        stream.abort();
    }
    // Lines typed before /quit are still sent: close the queue and let the sender finish it,
    // bounded by the client's retry budget.
    let Chat { send_tx, .. } = chat;
    drop(send_tx);
    if tokio::time::timeout(SEND_DRAIN_MAX, sender).await.is_err() {
        println!("some lines were not acknowledged in time and may not have been sent");
    }
    // The editor thread ends on Quit or when its channel closes.
    drop(to_editor);
    let _ = editor.join();
    Ok(())
}

impl Chat {
    fn prompt(&self) -> String {
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
        format!("#{}{e2e} {reading} ({leader})> ", self.channel)
    }

    async fn handle_line(&mut self, line: &str) -> ToEditor {
        let input = match command::parse(line) {
            Ok(input) => input,
            Err(message) => {
                println!("{message}");
                return ToEditor::Prompt(self.prompt());
            }
        };
        match input {
            Input::Message(text) => {
                match actions::send_key(&self.keys, &self.encrypted, &self.channel) {
                    Ok(key) => self.queue(text, key).await,
                    Err(refusal) => println!("{refusal}"),
                }
            }
            Input::Plain(text) => self.queue(text, None).await,
            Input::Join(channel) => {
                if channel != self.channel {
                    self.previous.push(self.channel.clone());
                    self.enter(channel).await;
                }
            }
            Input::Leave => match self.previous.pop() {
                Some(channel) => {
                    println!("left #{}", self.channel);
                    self.enter(channel).await;
                }
                None => println!(
                    "#{} is your first channel: /join another, or /quit",
                    self.channel
                ),
            },
            Input::Channels => say(actions::channels(&self.client, &self.channel).await),
            Input::History(n) => self.history(None, n).await,
            Input::More(n) => match self.oldest_shown {
                Some(oldest) if oldest > 1 => self.history(Some(oldest), n).await,
                _ => println!("that is the start of #{}", self.channel),
            },
            Input::Who => say(actions::who(&self.client, &self.channel).await),
            Input::Servers => println!("{}", output::servers_table(&self.client.servers().await)),
            Input::KeyPrompt => {
                return ToEditor::AskSecret(format!("passphrase for #{}: ", self.channel));
            }
            Input::Key(passphrase) => self.set_key(&passphrase).await,
            Input::KeyClear => {
                lock(&self.keys).remove(&self.channel);
                println!(
                    "#{}: passphrase forgotten; new messages are sent in the clear",
                    self.channel
                );
            }
            Input::Create { channel, private } => {
                println!("{}", actions::create(&self.client, &channel, private).await);
            }
            Input::Invite(user) => {
                println!(
                    "{}",
                    actions::invite(&self.client, &self.channel, &user).await
                );
            }
            Input::Accept(channel) => match actions::accept(&self.client, &channel).await {
                Ok(joined) => {
                    println!("{joined}");
                    if channel != self.channel {
                        self.previous.push(self.channel.clone());
                        self.enter(channel).await;
                    }
                }
                Err(refusal) => println!("{refusal}"),
            },
            Input::Remove(user) => {
                println!(
                    "{}",
                    actions::remove(&self.client, &self.channel, &user).await
                );
            }
            Input::Members => say(actions::members(&self.client, &self.channel).await),
            Input::RetentionShow => say(actions::retention(&self.client, &self.channel).await),
            Input::RetentionSet(retention) => {
                say(actions::set_retention(&self.client, &self.channel, retention).await)
            }
            Input::Help => println!("{}", command::HELP),
            Input::Quit => return ToEditor::Quit,
        }
        ToEditor::Prompt(self.prompt())
    }

    async fn queue(&self, text: String, key: Option<crypto::ChannelKeyV2>) {
        if self
            .send_tx
            .send((self.channel.clone(), text, key))
            .await
            .is_err()
        {
            println!("the sender stopped: restart the client");
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
            println!("{notice}");
        }
        let head = match self.client.history(&self.channel, None, JOIN_HISTORY).await {
            Ok(page) => {
                println!("-- #{} ({} messages) --", self.channel, page.head);
                self.oldest_shown = page.messages.first().map(|m| m.seq);
                let now = timefmt::now_ms();
                for message in &page.messages {
                    let line = show_line(&self.client, &self.keys, &self.encrypted, message).await;
                    println!("{}", line(now));
                }
                page.head
            }
            Err(e) => {
                println!(
                    "cannot read #{}'s history: {}",
                    self.channel,
                    output::sanitize(&e.to_string())
                );
                0
            }
        };
        let sub = self.client.subscribe(&self.channel, head);
        self.stream = Some(tokio::spawn(stream_loop(
            self.client.clone(),
            sub,
            self.keys.clone(),
            self.encrypted.clone(),
            self.printer.clone(),
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
        println!("{said}");
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
                    println!("{}", line(now));
                }
                if page.messages.is_empty() {
                    println!("#{} has no messages yet", self.channel);
                }
            }
            Err(e) => println!("cannot read history: {}", output::sanitize(&e.to_string())),
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
    printer: Printer,
) {
    while let Some(next) = sub.recv().await {
        let line = match next {
            Ok(message) => show_line(&client, &keys, &encrypted, &message).await(timefmt::now_ms()),
            Err(e) => format!(
                "* stream of #{} stopped: {}",
                sub.channel(),
                output::sanitize(&e.to_string())
            ),
        };
        print(&printer, line);
    }
}

/// Prints each line.
fn say(lines: Vec<String>) {
    for line in lines {
        println!("{line}");
    }
}
