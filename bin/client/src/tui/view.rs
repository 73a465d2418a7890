//! Draws the [`Model`]: the channel list on the left, the shown channel's scrollback, a status
//! bar and the input line. Times are drawn at every frame from the clock, so "5s ago" stays
//! true while a line is on screen. A frame lays out only what fits on screen, so its cost
//! does not grow with the scrollback or the number of channels.

use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line as TextLine, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};
use ratatui::Frame;

use super::model::{Line, Model};
use crate::output::CONTINUATION;
use crate::timefmt::{self, LocalClock};
use unicode_width::UnicodeWidthChar as _;

/// The status bar's facts, gathered by the caller from the client.
#[derive(Debug, Default, Clone)]
pub struct Status {
    /// The node read from, by name, with its RTT.
    pub reading: String,
    /// The leader, by name.
    pub leader: String,
    /// `connected`, `connecting`, `no leader: sends wait`.
    pub connection: String,
    /// The shown channel's encryption: `e2e`, `e2e, no key: /key`, `plain`.
    pub security: String,
    /// Who types in the shown channel (`bob is typing…`), or empty.
    pub typing: String,
    /// How many users are online, once known.
    pub online: Option<usize>,
}

/// Smallest terminal drawn; a smaller one is told so.
pub const MIN_SIZE: (u16, u16) = (40, 6);
/// Width of the channel list.
const LIST_WIDTH: u16 = 20;
/// Most rows the input line grows to.
const INPUT_ROWS_MAX: u16 = 5;
/// What the input line starts with.
const PROMPT: &str = "> ";

/// Colours names are drawn in, picked by a stable hash of the name.
const NICK_COLOURS: [Color; 10] = [
    Color::Cyan,
    Color::Green,
    Color::Yellow,
    Color::Blue,
    Color::Magenta,
    Color::LightCyan,
    Color::LightGreen,
    Color::LightYellow,
    Color::LightBlue,
    Color::LightMagenta,
];

/// The colour of `name`: the same on every screen and every run (FNV-1a, not the std hasher,
/// whose seed changes between runs).
pub fn nick_colour(name: &str) -> Color {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let at = usize::try_from(hash % NICK_COLOURS.len() as u64).unwrap_or(0);
    NICK_COLOURS[at]
}

/// Draws the whole screen at `now_ms`.
pub fn draw(
    frame: &mut Frame<'_>,
    model: &Model,
    status: &Status,
    now_ms: u64,
    clock: &LocalClock,
) {
    let area = frame.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        frame.render_widget(
            Paragraph::new(format!(
                "terminal too small ({}x{}): cellchat needs at least {}x{}",
                area.width, area.height, MIN_SIZE.0, MIN_SIZE.1
            ))
            .wrap(Wrap { trim: true }),
            area,
        );
        return;
    }
    let (input, cursor) = input_text(model);
    let (rows, at) = input_rows(&input, cursor, area.width);
    let input_height = u16::try_from(rows.len())
        .unwrap_or(u16::MAX)
        .clamp(1, INPUT_ROWS_MAX);
    let [body, bar, input] = Layout::vertical([
        Constraint::Min(1),
        Constraint::Length(1),
        Constraint::Length(input_height),
    ])
    .areas(area);
    let [list, messages] =
        Layout::horizontal([Constraint::Length(LIST_WIDTH), Constraint::Min(1)]).areas(body);
    draw_list(frame, model, list);
    draw_messages(frame, model, messages, now_ms, clock);
    draw_status(frame, model, status, bar);
    draw_input(frame, rows, at, input);
}

/// The input laid out in rows of `width` terminal cells, cut by display width (a wide
/// character takes two cells and never straddles rows), and the cursor's (row, column).
fn input_rows(chars: &[char], cursor: usize, width: u16) -> (Vec<String>, (usize, usize)) {
    let width = usize::from(width.max(1));
    let mut rows = vec![String::new()];
    let mut used = 0;
    let mut at = (0, 0);
    for (i, &c) in chars.iter().enumerate() {
        let w = c.width().unwrap_or(0);
        if used + w > width {
            rows.push(String::new());
            used = 0;
        }
        if i == cursor {
            at = (rows.len() - 1, used);
        }
        rows.last_mut().expect("never empty").push(c);
        used += w;
    }
    if cursor >= chars.len() {
        if used >= width {
            rows.push(String::new());
            used = 0;
        }
        at = (rows.len() - 1, used);
    }
    (rows, at)
}

/// The channel list: as many as fit, scrolled so the shown one is always visible, with a
/// count of what is not.
fn draw_list(frame: &mut Frame<'_>, model: &Model, area: Rect) {
    let height = usize::from(area.height);
    let total = model.order.len();
    let at = model
        .order
        .iter()
        .position(|c| *c == model.current)
        .unwrap_or(0);
    let fits = if total > height {
        height.saturating_sub(1)
    } else {
        height
    };
    let first = at.saturating_sub(fits.saturating_sub(1));
    let mut lines: Vec<TextLine<'_>> = model
        .order
        .iter()
        .skip(first)
        .take(fits)
        .map(|name| {
            let view = &model.channels[name];
            let mut style = Style::default();
            if *name == model.current {
                style = style.add_modifier(Modifier::REVERSED);
            } else if view.muted {
                style = style.fg(Color::DarkGray);
            } else if view.mentions > 0 {
                style = style.fg(Color::Red).add_modifier(Modifier::BOLD);
            } else if view.unread > 0 {
                style = style.add_modifier(Modifier::BOLD);
            }
            let more = if view.unread_more { "+" } else { "" };
            let count = match (view.mentions, view.unread) {
                (0, 0) => String::new(),
                (0, n) => format!(" ({n}{more})"),
                (m, n) => format!(" ({n}{more}, @{m})"),
            };
            let muted = if view.muted { " ~" } else { "" };
            let name = crate::actions::label(name);
            TextLine::from(Span::styled(format!("{name}{count}{muted}"), style))
        })
        .collect();
    if total > fits {
        let hidden = total - fits;
        lines.push(TextLine::from(Span::styled(
            format!("+{hidden} more (Ctrl-N)"),
            Style::default().fg(Color::DarkGray),
        )));
    }
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::RIGHT)),
        area,
    );
}

fn dim() -> Style {
    Style::default().fg(Color::DarkGray)
}

fn draw_messages(
    frame: &mut Frame<'_>,
    model: &Model,
    area: Rect,
    now_ms: u64,
    clock: &LocalClock,
) {
    let view = model.shown();
    let height = usize::from(area.height);
    // Every line takes at least one row, so the last `height` lines fill the screen.
    let end = view.lines.len().saturating_sub(view.scroll);
    let start = end.saturating_sub(height);
    let mut out: Vec<TextLine<'_>> = Vec::new();
    if start == 0 && view.at_start {
        out.push(TextLine::from(Span::styled(
            format!(
                "-- the start of {} --",
                crate::actions::label(&model.current)
            ),
            dim(),
        )));
    } else if start == 0 && !view.lines.is_empty() {
        out.push(TextLine::from(Span::styled(
            "-- PgUp for older messages --",
            dim(),
        )));
    }
    let divider_at = view.divider.and_then(|d| first_new(view, d));
    let mut last_date = start
        .checked_sub(1)
        .map(|before| clock.date(view.lines[before].at_ms()));
    for line in view.lines.range(start..end) {
        let date = clock.date(line.at_ms());
        if last_date.as_ref() != Some(&date) {
            out.push(TextLine::from(Span::styled(format!("── {date} ──"), dim())));
        }
        last_date = Some(date);
        match line {
            Line::Message(m) => {
                if divider_at == Some(m.seq) {
                    out.push(TextLine::from(Span::styled(
                        "── new since you last read ──",
                        Style::default().fg(Color::Red),
                    )));
                }
                let mut spans = vec![
                    Span::styled(
                        format!(
                            "#{} {} {:>7} ",
                            m.seq,
                            clock.time_of_day(m.at_ms),
                            timefmt::relative(now_ms, m.at_ms)
                        ),
                        dim(),
                    ),
                    Span::styled(
                        m.sender.clone(),
                        Style::default()
                            .fg(nick_colour(&m.sender))
                            .add_modifier(Modifier::BOLD),
                    ),
                    Span::raw(": "),
                ];
                for marker in &m.markers {
                    spans.push(Span::styled(
                        format!("{marker} "),
                        Style::default().fg(Color::Red),
                    ));
                }
                let body = if m.mentions_me {
                    Style::default()
                        .fg(Color::Yellow)
                        .add_modifier(Modifier::BOLD)
                } else {
                    Style::default()
                };
                if let Some(proto::Relation::Reply { to }) = &m.relation {
                    spans.push(Span::styled(format!("↪ #{to} "), dim()));
                }
                let mut text = m.text.split('\n');
                spans.push(Span::styled(text.next().unwrap_or("").to_owned(), body));
                let after = annotations(m);
                if !after.is_empty() {
                    spans.push(Span::styled(after, dim()));
                }
                out.push(TextLine::from(spans));
                for more in text {
                    out.push(TextLine::from(Span::styled(
                        format!("{CONTINUATION}{more}"),
                        body,
                    )));
                }
            }
            Line::Notice { at_ms, text } => {
                let time = clock.time_of_day(*at_ms);
                let mut text = text.split('\n');
                out.push(TextLine::from(Span::styled(
                    format!("{time} -- {}", text.next().unwrap_or("")),
                    Style::default().fg(Color::Gray),
                )));
                for more in text {
                    out.push(TextLine::from(Span::styled(
                        format!("{CONTINUATION}{more}"),
                        Style::default().fg(Color::Gray),
                    )));
                }
            }
        }
    }
    let paragraph = Paragraph::new(out).wrap(Wrap { trim: false });
    // Bottom-aligned: the newest line sits on the last row, older rows scroll off the top.
    let total = paragraph.line_count(area.width);
    let offset = total.saturating_sub(height);
    let offset = u16::try_from(offset).unwrap_or(u16::MAX);
    frame.render_widget(paragraph.scroll((offset, 0)), area);
}

/// The seq of the first message line after `divider` (the divider goes right above it).
fn first_new(view: &crate::tui::model::Channel, divider: u64) -> Option<u64> {
    view.lines.iter().find_map(|l| match l {
        Line::Message(m) if m.seq > divider => Some(m.seq),
        _ => None,
    })
}

/// ` (edited) [👍 2] [3 replies]` after a message's first line, sanitized; or nothing.
fn annotations(m: &crate::tui::model::Shown) -> String {
    let reactions = m
        .reactions
        .iter()
        .map(|(e, users)| (e.as_str(), users.len()));
    crate::output::annotation_text(m.edited, reactions, m.replies)
}

fn draw_status(frame: &mut Frame<'_>, model: &Model, status: &Status, area: Rect) {
    let view = model.shown();
    let scrolled = if view.scroll > 0 {
        format!(" | {} newer below: End", view.scroll)
    } else {
        String::new()
    };
    let typing = if status.typing.is_empty() {
        String::new()
    } else {
        format!(" {} |", status.typing)
    };
    let online = status
        .online
        .map_or_else(String::new, |n| format!(" | {n} online"));
    let text = format!(
        "{typing} {} in {} [{}] | read {} | leader {} | {}{online}{scrolled}",
        model.me,
        crate::actions::label(&model.current),
        status.security,
        status.reading,
        status.leader,
        status.connection
    );
    frame.render_widget(
        Paragraph::new(text).style(Style::default().add_modifier(Modifier::REVERSED)),
        area,
    );
}

/// The input as drawn (the prompt, then the input with a secret masked and line breaks as
/// `⏎`), as chars, and the cursor's index in them.
fn input_text(model: &Model) -> (Vec<char>, usize) {
    let prompt = model.asking.as_deref().unwrap_or(PROMPT);
    let mut chars: Vec<char> = prompt.chars().collect();
    let start = chars.len();
    chars.extend(model.input.text.chars().map(|c| match c {
        _ if model.asking.is_some() => '*',
        '\n' => '⏎',
        c => c,
    }));
    (chars, start + model.input.cursor)
}

fn draw_input(frame: &mut Frame<'_>, rows: Vec<String>, (row, column): (usize, usize), area: Rect) {
    // Long input scrolls so the cursor's row is always on screen.
    let offset = row.saturating_sub(usize::from(area.height.saturating_sub(1)));
    let lines: Vec<TextLine<'_>> = rows.into_iter().skip(offset).map(TextLine::from).collect();
    frame.render_widget(Paragraph::new(lines), area);
    let x = u16::try_from(column).unwrap_or(0);
    let y = u16::try_from(row - offset).unwrap_or(0);
    frame.set_cursor_position(Position::new(area.x + x, area.y + y));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tui::model::Shown;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen(model: &Model, width: u16, height: u16, now_ms: u64) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test backend");
        let clock = LocalClock::in_zone(jiff::tz::TimeZone::UTC);
        let status = Status {
            reading: "n1 0.2ms".into(),
            leader: "n2".into(),
            connection: "connected".into(),
            security: "plain".into(),
            ..Status::default()
        };
        terminal
            .draw(|f| draw(f, model, &status, now_ms, &clock))
            .expect("draw");
        let buffer = terminal.backend().buffer().clone();
        let mut text = String::new();
        for y in 0..buffer.area.height {
            for x in 0..buffer.area.width {
                text.push_str(buffer[(x, y)].symbol());
            }
            text.push('\n');
        }
        text
    }

    fn msg(seq: u64, sender: &str, text: &str, at_ms: u64) -> Shown {
        Shown {
            seq,
            sender: sender.into(),
            text: text.into(),
            at_ms,
            markers: Vec::new(),
            mentions_me: false,
            ..Shown::default()
        }
    }

    const DAY: u64 = 86_400_000;
    // 2025-11-27T10:00:00Z
    const AT: u64 = 1_764_201_600_000 + 10 * 3_600_000;

    #[test]
    fn relative_times_change_while_the_line_stays() {
        let mut m = Model::new("alice", "general");
        m.on_message("general", msg(1, "bob", "hello", AT));
        let first = screen(&m, 80, 10, AT + 2_000);
        let later = screen(&m, 80, 10, AT + 65_000);
        assert!(first.contains("10:00  2s ago bob: hello"), "{first}");
        assert!(later.contains("10:00  1m ago bob: hello"), "{later}");
    }

    #[test]
    fn day_separators_multi_line_messages_and_the_status_bar() {
        let mut m = Model::new("alice", "general");
        m.on_message("general", msg(1, "bob", "yesterday", AT - DAY));
        m.on_message("general", msg(2, "bob", "line one\nline two", AT));
        let s = screen(&m, 80, 12, AT);
        assert!(s.contains("── Wed 26 Nov 2025 ──"), "{s}");
        assert!(s.contains("── Thu 27 Nov 2025 ──"), "{s}");
        assert!(s.contains(&format!("{CONTINUATION}line two")), "{s}");
        assert!(
            s.contains("alice in #general [plain] | read n1 0.2ms | leader n2"),
            "{s}"
        );
    }

    #[test]
    fn the_newest_line_is_on_the_last_row_even_when_long_lines_wrap() {
        let mut m = Model::new("alice", "general");
        for seq in 1..=30 {
            m.on_message("general", msg(seq, "bob", &"x".repeat(150), AT));
        }
        m.on_message("general", msg(31, "bob", "the newest", AT));
        let s = screen(&m, 60, 12, AT);
        let rows: Vec<&str> = s.lines().collect();
        // Rows: messages..., status bar, input line.
        assert!(rows[rows.len() - 3].contains("the newest"), "{s}");
    }

    #[test]
    fn the_status_bar_says_who_types_and_how_many_are_online() {
        let m = Model::new("alice", "general");
        let mut terminal = Terminal::new(TestBackend::new(100, 8)).expect("test backend");
        let clock = LocalClock::in_zone(jiff::tz::TimeZone::UTC);
        let status = Status {
            typing: crate::output::typing_text(&["bob".into(), "carol".into()]),
            online: Some(3),
            ..Status::default()
        };
        terminal
            .draw(|f| draw(f, &m, &status, AT, &clock))
            .expect("draw");
        let s: String = terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        assert!(
            s.contains("bob and carol are typing… | alice in #general"),
            "{s}"
        );
        assert!(s.contains("| 3 online"), "{s}");
    }

    #[test]
    fn a_terminal_too_small_is_told_so() {
        let m = Model::new("alice", "general");
        let s = screen(&m, 30, 4, AT);
        assert!(s.contains("terminal too small"), "{s}");
    }

    #[test]
    fn thousands_of_channels_keep_the_shown_one_visible_and_count_the_rest() {
        let mut m = Model::new("alice", "general");
        for i in 0..3_000 {
            m.open(&format!("c{i}"));
        }
        m.on_message("c10", msg(1, "bob", "@alice hi", AT));
        let s = screen(&m, 80, 20, AT);
        assert!(s.contains("#c2999"), "{s}");
        assert!(s.contains("more (Ctrl-N)"), "{s}");
    }

    #[test]
    fn wide_characters_in_the_input_keep_the_cursor_on_the_right_cell() {
        let chars: Vec<char> = "> 日本語abc".chars().collect();
        // Width 7: "> 日本" fills 6 cells, "語" would straddle, so it starts row 2.
        let (rows, at) = input_rows(&chars, chars.len(), 7);
        assert_eq!(rows, ["> 日本", "語abc"]);
        assert_eq!(at, (1, 5));
        let (_, at) = input_rows(&chars, 4, 7);
        assert_eq!(at, (1, 0), "the cursor on 語");
        let (rows, at) = input_rows(&chars[..4], 4, 6);
        assert_eq!(
            rows,
            ["> 日本", ""],
            "a full row puts the cursor on the next"
        );
        assert_eq!(at, (1, 0));
    }

    #[test]
    fn a_secret_is_masked() {
        let mut m = Model::new("alice", "general");
        m.ask("passphrase for #general: ".into());
        m.input.insert("hunter2");
        let s = screen(&m, 80, 10, AT);
        assert!(s.contains("passphrase for #general: *******"), "{s}");
        assert!(!s.contains("hunter2"), "{s}");
    }
}
