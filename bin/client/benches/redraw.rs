//! What the full-screen client costs per frame, without a terminal (ratatui's `TestBackend`
//! on a 200x50 screen): a whole redraw with 10,000 lines of scrollback in each of 50 channels,
//! the same scrolled back into the middle, and one incoming message taken into the model and
//! drawn, which is what the screen adds to a message's delivery. Run:
//! `cargo bench -p client --bench redraw`.

use std::hint::black_box;

use client::timefmt::LocalClock;
use client::tui::model::{Model, Shown, SCROLLBACK_MAX};
use client::tui::view::{self, Status};
use criterion::{criterion_group, criterion_main, Criterion};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

const CHANNELS: usize = 50;
const START_MS: u64 = 1_764_201_600_000;

fn message(seq: u64, text: &str) -> Shown {
    Shown {
        seq,
        sender: format!("user{}", seq % 17),
        text: text.to_owned(),
        at_ms: START_MS + seq * 1_000,
        markers: Vec::new(),
        mentions_me: false,
        ..Shown::default()
    }
}

/// 50 channels with a full scrollback each; every 10th line long enough to wrap, every 50th
/// on three lines, every 100th a mention.
fn full_model() -> Model {
    let mut model = Model::new("alice", "c0");
    for c in 0..CHANNELS {
        model.open(&format!("c{c}"));
    }
    model.open("c0");
    for c in 0..CHANNELS {
        let channel = format!("c{c}");
        for seq in 1..=SCROLLBACK_MAX as u64 {
            let text = match seq {
                s if s % 100 == 0 => "are you there @alice?".to_owned(),
                s if s % 50 == 0 => "first line\nsecond line\nthird line".to_owned(),
                s if s % 10 == 0 => "a long line that wraps ".repeat(12),
                _ => format!("message number {seq} in #{channel}"),
            };
            model.on_message(&channel, message(seq, &text));
        }
    }
    model
}

fn status() -> Status {
    Status {
        reading: "n2 0.4ms".into(),
        leader: "n1".into(),
        connection: "connected".into(),
        security: "plain".into(),
        ..Status::default()
    }
}

fn redraw(c: &mut Criterion) {
    let clock = LocalClock::system();
    let status = status();
    let now = START_MS + SCROLLBACK_MAX as u64 * 1_000 + 5_000;
    let mut terminal = Terminal::new(TestBackend::new(200, 50)).expect("test backend");
    let mut model = full_model();
    let mut group = c.benchmark_group("redraw");
    group.bench_function("200x50/50ch/10k-lines/bottom", |b| {
        b.iter(|| {
            terminal
                .draw(|f| view::draw(f, black_box(&model), &status, now, &clock))
                .expect("draw");
        });
    });
    model.scroll(true, SCROLLBACK_MAX / 2, 45);
    group.bench_function("200x50/50ch/10k-lines/middle", |b| {
        b.iter(|| {
            terminal
                .draw(|f| view::draw(f, black_box(&model), &status, now, &clock))
                .expect("draw");
        });
    });
    model.scroll_to(false, 45);
    let mut seq = SCROLLBACK_MAX as u64;
    group.bench_function("200x50/50ch/10k-lines/incoming+draw", |b| {
        b.iter(|| {
            seq += 1;
            model.on_message("c0", message(seq, "a new message arrives"));
            terminal
                .draw(|f| view::draw(f, &model, &status, now, &clock))
                .expect("draw");
        });
    });
    group.finish();
}

criterion_group!(benches, redraw);
criterion_main!(benches);
