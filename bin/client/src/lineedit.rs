//! The line mode's input: on a terminal, a one-row line editor in raw mode that prints
//! incoming lines above itself and redraws what is being typed; without one (a pipe, or
//! `TERM=dumb`), plain lines from stdin and plain lines to stdout.
//!
//! One task owns the terminal. Everything printed goes through it ([`Screen`]), so an
//! incoming line never lands in the middle of the input, and every key of a burst or a paste
//! is handled as it arrives.

use std::fs::File;
use std::io::{BufRead as _, BufWriter, Write as _};
use std::os::fd::AsFd as _;
use std::time::Duration;

use crossterm::cursor::MoveToColumn;
use crossterm::event::{
    DisableBracketedPaste, EnableBracketedPaste, Event, EventStream, KeyCode, KeyEvent,
    KeyEventKind, KeyModifiers,
};
use crossterm::style::Print;
use crossterm::terminal::{self, disable_raw_mode, enable_raw_mode, Clear, ClearType};
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use unicode_width::{UnicodeWidthChar as _, UnicodeWidthStr as _};

use crate::command;
use crate::tui::model::{Input, QUIT_WINDOW_MS};

/// What the editor hands the chat.
#[derive(Debug, PartialEq, Eq)]
pub enum FromEditor {
    /// An entered line.
    Line(String),
    /// The secret asked for.
    Secret(String),
    /// Ctrl-D, a second Ctrl-C, end of input, or the terminal is gone.
    Quit,
    /// The input changed and is now this (not a secret); for typing indicators.
    Typed(String),
}

enum ToEditor {
    Print(String),
    Prompt(String),
    AskSecret(String),
    /// Everything sent before is shown; end and give the terminal back.
    Close,
}

/// Where the chat prints, and how it sets the prompt.
#[derive(Clone)]
pub struct Screen {
    tx: mpsc::UnboundedSender<ToEditor>,
}

impl Screen {
    /// Prints `line` above the input (each of its lines).
    pub fn print(&self, line: impl Into<String>) {
        // The editor is gone only when the chat is ending: nothing to show it on.
        let _ = self.tx.send(ToEditor::Print(line.into()));
    }

    /// Shows `prompt` before the input from now on.
    pub fn prompt(&self, prompt: String) {
        let _ = self.tx.send(ToEditor::Prompt(prompt));
    }

    /// Asks for a secret: the next line is typed masked and comes back as
    /// [`FromEditor::Secret`], never kept in the input history.
    pub fn ask_secret(&self, prompt: String) {
        let _ = self.tx.send(ToEditor::AskSecret(prompt));
    }

    /// Ends the editor once everything printed so far is shown.
    pub fn close(&self) {
        let _ = self.tx.send(ToEditor::Close);
    }
}

/// Whether the line editor can draw here: stdin and stdout are terminals, `TERM` not `dumb`.
fn can_edit() -> bool {
    crate::tui::usable()
}

/// Starts the editor: on a terminal the raw-mode editor, otherwise plain lines. The task
/// ends after [`Screen::close`].
pub fn start() -> (Screen, mpsc::Receiver<FromEditor>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (lines_tx, lines_rx) = mpsc::channel(16);
    let task = if can_edit() {
        tokio::spawn(edit(rx, lines_tx))
    } else {
        plain(rx, lines_tx)
    };
    (Screen { tx }, lines_rx, task)
}

/// Raw mode and bracketed paste while it lives; the line is left clean when dropped.
struct RawMode;

impl RawMode {
    fn enter() -> std::io::Result<RawMode> {
        enable_raw_mode()?;
        let raw = RawMode;
        crossterm::execute!(std::io::stdout(), EnableBracketedPaste)?;
        Ok(raw)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Best effort: the terminal may be gone already.
        let _ = crossterm::execute!(
            std::io::stdout(),
            DisableBracketedPaste,
            MoveToColumn(0),
            Clear(ClearType::CurrentLine)
        );
        let _ = disable_raw_mode();
    }
}

/// The raw-mode editor's state.
struct Editor {
    input: Input,
    prompt: String,
    /// The prompt of the secret being asked for, if one is.
    asking: Option<String>,
    last_interrupt: Option<std::time::Instant>,
}

/// What a key asks for.
enum Step {
    Redraw,
    Send(FromEditor),
}

impl Editor {
    fn key(&mut self, key: KeyEvent) -> Step {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let input = &mut self.input;
        match key.code {
            KeyCode::Char('c') if ctrl => return self.interrupt(),
            KeyCode::Char('d') if ctrl && input.text.is_empty() => {
                return Step::Send(FromEditor::Quit);
            }
            KeyCode::Char('d') if ctrl => input.delete(),
            _ if input.edit(&key) => {}
            KeyCode::Enter => return self.enter(),
            KeyCode::Home => input.home_end(false),
            KeyCode::End => input.home_end(true),
            KeyCode::Up if self.asking.is_none() => input.recall(true),
            KeyCode::Down if self.asking.is_none() => input.recall(false),
            KeyCode::Tab if self.asking.is_none() => {
                let names: Vec<String> = command::NAMES.iter().map(|n| (*n).to_owned()).collect();
                input.complete(&names);
            }
            _ => {}
        }
        Step::Redraw
    }

    fn enter(&mut self) -> Step {
        self.last_interrupt = None;
        if self.asking.take().is_some() {
            let secret = std::mem::take(&mut self.input.text);
            self.input.clear();
            return Step::Send(FromEditor::Secret(secret));
        }
        Step::Send(FromEditor::Line(self.input.take()))
    }

    /// Ctrl-C: clears the line or the question; on an empty line, or a second time within
    /// [`QUIT_WINDOW_MS`], quits.
    fn interrupt(&mut self) -> Step {
        let window = Duration::from_millis(QUIT_WINDOW_MS);
        if self.last_interrupt.is_some_and(|at| at.elapsed() <= window) {
            return Step::Send(FromEditor::Quit);
        }
        self.last_interrupt = Some(std::time::Instant::now());
        self.asking = None;
        self.input.clear();
        Step::Redraw
    }

    fn paste(&mut self, text: &str) -> Step {
        if self.input.paste(text) {
            self.enter()
        } else {
            Step::Redraw
        }
    }

    /// The input row as drawn: the prompt, then as much of the input as fits around the
    /// cursor (a secret masked, line breaks as `⏎`), and the cursor's column. Widths are in
    /// terminal cells, so wide characters keep the cursor on its cell.
    fn row(&self, width: usize) -> (String, u16) {
        let prompt = self.asking.as_deref().unwrap_or(&self.prompt);
        let text: Vec<char> = self
            .input
            .text
            .chars()
            .map(|c| match c {
                _ if self.asking.is_some() => '*',
                '\n' => '⏎',
                c => c,
            })
            .collect();
        let cells = |c: char| c.width().unwrap_or(0);
        let prompt_cells = prompt.width();
        let room = width.saturating_sub(prompt_cells + 1).max(1);
        let cursor = self.input.cursor.min(text.len());
        // Back from the cursor as far as fits, keeping a cell for the cursor itself.
        let (mut start, mut used) = (cursor, 1);
        while start > 0 && used + cells(text[start - 1]) <= room {
            used += cells(text[start - 1]);
            start -= 1;
        }
        let mut shown = String::new();
        let mut filled = 0;
        for &c in &text[start..] {
            if filled + cells(c) > room {
                break;
            }
            shown.push(c);
            filled += cells(c);
        }
        let before: usize = text[start..cursor].iter().map(|&c| cells(c)).sum();
        let column = u16::try_from(prompt_cells + before).unwrap_or(u16::MAX);
        (format!("{prompt}{shown}"), column)
    }
}

/// The terminal as the editor writes it: buffered whole, so each update (a message and the
/// input row drawn again under it) reaches the terminal in one write. `Stdout` writes every
/// line as it ends, and a terminal could show a message with an empty row under it.
fn terminal() -> std::io::Result<BufWriter<File>> {
    let fd = std::io::stdout().as_fd().try_clone_to_owned()?;
    Ok(BufWriter::with_capacity(TERMINAL_BUFFER, File::from(fd)))
}

/// Bytes the editor's terminal buffers: more than any update but a very long message.
const TERMINAL_BUFFER: usize = 64 * 1024;

/// Redraws the input row.
fn draw(out: &mut impl std::io::Write, editor: &Editor) -> std::io::Result<()> {
    let width = terminal::size().map_or(80, |(w, _)| usize::from(w));
    let (row, column) = editor.row(width);
    crossterm::queue!(
        out,
        MoveToColumn(0),
        Clear(ClearType::CurrentLine),
        Print(row),
        MoveToColumn(column)
    )?;
    out.flush()
}

/// Prints `text` above the input row, then redraws the row.
fn print_above(out: &mut impl std::io::Write, editor: &Editor, text: &str) -> std::io::Result<()> {
    crossterm::queue!(out, MoveToColumn(0), Clear(ClearType::CurrentLine))?;
    for line in text.split('\n') {
        // Raw mode: a line break is ours to make.
        crossterm::queue!(out, Print(line), Print("\r\n"))?;
    }
    draw(out, editor)
}

async fn edit(mut rx: mpsc::UnboundedReceiver<ToEditor>, tx: mpsc::Sender<FromEditor>) {
    let raw = match RawMode::enter() {
        Ok(raw) => raw,
        Err(e) => {
            println!("cannot use the terminal ({e}): reading plain lines");
            let _ = plain(rx, tx).await;
            return;
        }
    };
    let mut editor = Editor {
        input: Input::default(),
        prompt: "> ".to_owned(),
        asking: None,
        last_interrupt: None,
    };
    let mut keys = EventStream::new();
    let mut out = match terminal() {
        Ok(out) => out,
        Err(e) => {
            drop(raw);
            println!("cannot use the terminal ({e}): reading plain lines");
            let _ = plain(rx, tx).await;
            return;
        }
    };
    loop {
        let drawn = tokio::select! {
            event = keys.next() => {
                let step = match event {
                    Some(Ok(Event::Key(key))) if key.kind != KeyEventKind::Release => {
                        editor.key(key)
                    }
                    Some(Ok(Event::Paste(text))) => editor.paste(&text),
                    Some(Ok(_)) => Step::Redraw,
                    Some(Err(_)) | None => Step::Send(FromEditor::Quit),
                };
                match step {
                    Step::Redraw => {
                        if editor.asking.is_none() {
                            // Dropped when the chat is busy: typing notes are renewed anyway.
                            let _ = tx.try_send(FromEditor::Typed(editor.input.text.clone()));
                        }
                        draw(&mut out, &editor)
                    }
                    Step::Send(FromEditor::Quit) => {
                        let _ = tx.send(FromEditor::Quit).await;
                        break;
                    }
                    Step::Send(FromEditor::Line(line)) => {
                        // The entered line stays on screen, after the prompt it was typed at.
                        let echo = format!("{}{}", editor.prompt, line.replace('\n', "\n    "));
                        let drawn = print_above(&mut out, &editor, &echo);
                        if tx.send(FromEditor::Line(line)).await.is_err() {
                            break;
                        }
                        drawn
                    }
                    Step::Send(secret) => {
                        let drawn = draw(&mut out, &editor);
                        if tx.send(secret).await.is_err() {
                            break;
                        }
                        drawn
                    }
                }
            }
            message = rx.recv() => match message {
                Some(ToEditor::Print(text)) => print_above(&mut out, &editor, &text),
                Some(ToEditor::Prompt(prompt)) => {
                    editor.prompt = prompt;
                    draw(&mut out, &editor)
                }
                Some(ToEditor::AskSecret(prompt)) => {
                    editor.input.clear();
                    editor.asking = Some(prompt);
                    draw(&mut out, &editor)
                }
                Some(ToEditor::Close) | None => break,
            },
        };
        if drawn.is_err() {
            // The terminal is gone.
            let _ = tx.send(FromEditor::Quit).await;
            break;
        }
    }
    drop(out);
    drop(raw);
}

/// Plain lines: stdin is read on a thread of its own (a blocking read cannot be cancelled,
/// and must not hold the runtime open at exit).
fn plain(
    mut rx: mpsc::UnboundedReceiver<ToEditor>,
    tx: mpsc::Sender<FromEditor>,
) -> JoinHandle<()> {
    let (lines_tx, mut lines_rx) = mpsc::channel::<Result<String, String>>(16);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut reader = stdin.lock();
        loop {
            let mut bytes = Vec::new();
            let line = match reader.read_until(b'\n', &mut bytes) {
                Ok(0) | Err(_) => return,
                Ok(_) => String::from_utf8(bytes)
                    .map(|l| l.trim_end_matches(['\r', '\n']).to_owned())
                    .map_err(|_| "input is not valid UTF-8: nothing sent".to_owned()),
            };
            if lines_tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut asking = false;
        let mut input_open = true;
        loop {
            tokio::select! {
                // What the chat printed goes out before the next line is read.
                biased;
                message = rx.recv() => match message {
                    Some(ToEditor::Print(text)) => println!("{text}"),
                    Some(ToEditor::Prompt(_)) => {}
                    Some(ToEditor::AskSecret(prompt)) => {
                        asking = true;
                        println!("{prompt}");
                    }
                    Some(ToEditor::Close) | None => return,
                },
                line = lines_rx.recv(), if input_open => {
                    let event = match line {
                        Some(Ok(line)) if asking => {
                            asking = false;
                            FromEditor::Secret(line)
                        }
                        Some(Ok(line)) => FromEditor::Line(line),
                        Some(Err(unreadable)) => {
                            println!("{unreadable}");
                            continue;
                        }
                        None => FromEditor::Quit,
                    };
                    // After the end of input, only printing goes on, until Close.
                    input_open = event != FromEditor::Quit;
                    let _ = tx.send(event).await;
                }
            }
        }
    })
}

/// Asks for a secret on the terminal without echoing it (each typed character shows as `*`).
/// Without a terminal, reads one line from stdin. `None` at end of input, on Ctrl-C or
/// Ctrl-D, or when the terminal cannot be used.
pub fn ask_secret(prompt: &str) -> Option<String> {
    use std::io::IsTerminal as _;
    if !std::io::stdin().is_terminal() {
        let mut line = String::new();
        return match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_owned()),
        };
    }
    let mut out = std::io::stderr();
    enable_raw_mode().ok()?;
    let _ = write!(out, "{prompt}").and_then(|()| out.flush());
    let mut secret = String::new();
    let answer = loop {
        let Ok(event) = crossterm::event::read() else {
            break None;
        };
        let Event::Key(key) = event else { continue };
        if key.kind == KeyEventKind::Release {
            continue;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Enter => break Some(std::mem::take(&mut secret)),
            KeyCode::Char('c' | 'd') if ctrl => break None,
            KeyCode::Char(c) if !ctrl => {
                secret.push(c);
                let _ = write!(out, "*").and_then(|()| out.flush());
            }
            KeyCode::Backspace if secret.pop().is_some() => {
                let _ = write!(out, "\u{8} \u{8}").and_then(|()| out.flush());
            }
            _ => {}
        }
    };
    let _ = disable_raw_mode();
    let _ = writeln!(out);
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn editor(prompt: &str, text: &str) -> Editor {
        let mut input = Input::default();
        input.insert(text);
        Editor {
            input,
            prompt: prompt.to_owned(),
            asking: None,
            last_interrupt: None,
        }
    }

    fn key(code: KeyCode, modifiers: KeyModifiers) -> KeyEvent {
        KeyEvent::new(code, modifiers)
    }

    #[test]
    fn a_long_input_scrolls_to_keep_the_cursor_in_view() {
        let e = editor("> ", &"x".repeat(30));
        let (row, column) = e.row(20);
        // 17 cells after the prompt: the last 16 chars and the cursor after them.
        assert_eq!(row, format!("> {}", "x".repeat(16)));
        assert_eq!(column, 18);
        let e = editor("> ", "a\nb");
        assert_eq!(e.row(80), ("> a⏎b".to_owned(), 5));
        let e = editor("> ", "日本語");
        assert_eq!(
            e.row(80),
            ("> 日本語".to_owned(), 8),
            "wide characters take two cells"
        );
    }

    #[test]
    fn ctrl_c_clears_then_quits_and_ctrl_d_quits_only_on_an_empty_line() {
        let mut e = editor("> ", "half");
        assert!(matches!(
            e.key(key(KeyCode::Char('d'), KeyModifiers::CONTROL)),
            Step::Redraw
        ));
        assert!(matches!(
            e.key(key(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Step::Redraw
        ));
        assert!(e.input.text.is_empty());
        assert!(matches!(
            e.key(key(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Step::Send(FromEditor::Quit)
        ));
        let mut e = editor("> ", "");
        assert!(matches!(
            e.key(key(KeyCode::Char('d'), KeyModifiers::CONTROL)),
            Step::Send(FromEditor::Quit)
        ));
    }

    #[test]
    fn a_secret_is_masked_and_returned_apart() {
        let mut e = editor("> ", "");
        e.asking = Some("passphrase: ".into());
        e.input.insert("hunter2");
        assert_eq!(e.row(80).0, "passphrase: *******");
        assert!(matches!(e.enter(), Step::Send(FromEditor::Secret(s)) if s == "hunter2"));
        assert!(e.input.history.is_empty());
    }

    /// Records each write that reaches it.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl std::io::Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_message_and_the_input_under_it_reach_the_terminal_in_one_write() {
        let e = editor("> ", "half-typed");
        let mut out = BufWriter::with_capacity(TERMINAL_BUFFER, Writes::default());
        print_above(&mut out, &e, "alice: one\ntwo").unwrap();
        let writes = &out.get_ref().0;
        assert_eq!(writes.len(), 1, "one update, one write: {writes:?}");
        let shown = String::from_utf8_lossy(&writes[0]);
        let (one, two) = (
            shown.find("alice: one\r\n").unwrap(),
            shown.find("two\r\n").unwrap(),
        );
        let row = shown.find("> half-typed").unwrap();
        assert!(
            one < two && two < row,
            "the message above the input: {shown:?}"
        );
    }

    #[test]
    fn a_paste_ending_in_a_line_break_is_entered() {
        let mut e = editor("> ", "");
        assert!(matches!(
            e.paste("one\r\ntwo\u{1b}\n"),
            Step::Send(FromEditor::Line(l)) if l == "one\ntwo\u{fffd}"
        ));
    }
}
