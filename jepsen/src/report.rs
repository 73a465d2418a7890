//! Performance analysis and the results: `results.json` and `report.html` with inline SVG plots
//! (latency over time, throughput by `f`, nemesis intervals shaded, availability per fault
//! window), and the summary printed to the terminal.
//!
//! The SVG is written by hand: three plot shapes do not justify a plotting dependency. Latency
//! points are thinned to [`LATENCY_POINTS_MAX`] so a 1M-op history still gives a small page;
//! `fail` and `info` points are kept before `ok` points because they are rarer and matter more.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use crate::checker::Report;
use crate::history::{History, OpType, Process, F_SEND};

/// Most latency points drawn.
pub const LATENCY_POINTS_MAX: usize = 20_000;

const NS_PER_S: f64 = 1e9;

/// One completed client operation, paired with its invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// The function.
    pub f: String,
    /// `ok`, `fail` or `info` (an invocation never completed counts as `info`).
    pub kind: &'static str,
    /// Invocation time, ns.
    pub invoked: u64,
    /// Completion time minus invocation time, ns (to the history's end if never completed).
    pub latency: u64,
}

/// A nemesis fault interval: from an opening op to the matching closing op.
#[derive(Debug, Clone, Serialize)]
pub struct FaultWindow {
    /// `kill`, `pause`, `partition`, or the `X` of a `start-X`/`stop-X` pair.
    pub kind: String,
    /// Start, ns.
    pub start: u64,
    /// End, ns (the history's end if never closed).
    pub end: u64,
}

/// Availability of sends invoked during one set of windows.
#[derive(Debug, Clone, Serialize)]
pub struct Availability {
    /// The fault kind, or `"none"` for time outside every window.
    pub window: String,
    /// Start, ns (absent for `"none"`).
    pub start: Option<u64>,
    /// End, ns (absent for `"none"`).
    pub end: Option<u64>,
    /// Sends invoked in the window.
    pub sends: u64,
    /// Of those, acknowledged.
    pub ok: u64,
    /// `ok / sends`, or null without sends.
    pub fraction: Option<f64>,
}

/// Latency, throughput and fault windows of a history.
#[derive(Debug, Clone, Serialize)]
pub struct Perf {
    /// Client operations, invoke paired with completion.
    pub completions: Vec<Completion>,
    /// Nemesis intervals.
    pub windows: Vec<FaultWindow>,
    /// Availability per window, then outside all windows.
    pub availability: Vec<Availability>,
    /// Time of the last op, ns.
    pub end: u64,
}

/// Pairs each client invoke with the next completion of the same process and collects the
/// nemesis windows.
pub fn perf(history: &History) -> Perf {
    let end = history.ops().iter().map(|o| o.time).max().unwrap_or(0);
    let mut pending: HashMap<u64, (String, u64)> = HashMap::new();
    let mut completions = Vec::new();
    let mut windows = Vec::new();
    let mut open: BTreeMap<String, u64> = BTreeMap::new();
    for op in history.ops() {
        match op.process {
            Process::Nemesis => nemesis_edge(&op.f, op.time, &mut open, &mut windows),
            Process::Client(p) => {
                if op.kind == OpType::Invoke {
                    pending.insert(p, (op.f.clone(), op.time));
                } else if let Some((f, invoked)) = pending.remove(&p) {
                    let kind = op.kind.as_str();
                    completions.push(Completion {
                        f,
                        kind,
                        invoked,
                        latency: op.time.saturating_sub(invoked),
                    });
                }
            }
        }
    }
    for (f, invoked) in pending.into_values() {
        completions.push(Completion {
            f,
            kind: "info",
            invoked,
            latency: end - invoked,
        });
    }
    completions.sort_by_key(|c| c.invoked);
    for (kind, start) in open {
        windows.push(FaultWindow { kind, start, end });
    }
    windows.sort_by_key(|w| w.start);
    let availability = availability(&completions, &windows);
    Perf {
        completions,
        windows,
        availability,
        end,
    }
}

/// Opens or closes a window for a nemesis `f`, following Jepsen's pairing: `kill`…`start`,
/// `pause`…`resume`, `start-X`…`stop-X`. Other functions are instants and draw nothing.
fn nemesis_edge(f: &str, time: u64, open: &mut BTreeMap<String, u64>, out: &mut Vec<FaultWindow>) {
    let (kind, opens) = match f {
        "kill" => ("kill", true),
        "start" => ("kill", false),
        "pause" => ("pause", true),
        "resume" => ("pause", false),
        _ => match (f.strip_prefix("start-"), f.strip_prefix("stop-")) {
            (Some(k), _) => (k, true),
            (_, Some(k)) => (k, false),
            _ => return,
        },
    };
    if opens {
        open.entry(kind.to_string()).or_insert(time);
    } else if let Some(start) = open.remove(kind) {
        out.push(FaultWindow {
            kind: kind.to_string(),
            start,
            end: time,
        });
    }
}

/// Sends invoked in each window, and outside all of them; O((sends + windows) log sends).
fn availability(completions: &[Completion], windows: &[FaultWindow]) -> Vec<Availability> {
    // `completions` is sorted by invocation time, so is this; prefix sums of oks make each
    // window two binary searches.
    let sends: Vec<&Completion> = completions.iter().filter(|c| c.f == F_SEND).collect();
    let mut ok_before = Vec::with_capacity(sends.len() + 1);
    ok_before.push(0u64);
    for c in &sends {
        ok_before.push(ok_before.last().copied().unwrap_or(0) + u64::from(c.kind == "ok"));
    }
    let tally = |start: u64, end: u64| {
        let lo = sends.partition_point(|c| c.invoked < start);
        let hi = sends.partition_point(|c| c.invoked < end);
        ((hi - lo) as u64, ok_before[hi] - ok_before[lo])
    };
    let row = |window: String, start: Option<u64>, end: Option<u64>, (sends, ok): (u64, u64)| {
        let fraction = (sends > 0).then(|| ok as f64 / sends as f64);
        Availability {
            window,
            start,
            end,
            sends,
            ok,
            fraction,
        }
    };
    let mut out = Vec::new();
    for w in windows {
        out.push(row(
            w.kind.clone(),
            Some(w.start),
            Some(w.end),
            tally(w.start, w.end),
        ));
    }
    // Outside = all minus the union of the windows (windows of different kinds may overlap).
    let (mut inside, mut inside_ok) = (0, 0);
    let mut spans: Vec<(u64, u64)> = windows.iter().map(|w| (w.start, w.end)).collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    for (start, end) in merged {
        let (n, ok) = tally(start, end);
        inside += n;
        inside_ok += ok;
    }
    let total = (sends.len() as u64, ok_before[sends.len()]);
    out.push(row(
        "none".into(),
        None,
        None,
        (total.0 - inside, total.1 - inside_ok),
    ));
    out
}

/// The `results.json` document: the checker's report plus availability and fault windows.
pub fn results_json(report: &Report, perf: &Perf) -> Value {
    let mut v = serde_json::to_value(report).expect("report serializes: plain data");
    if let Value::Object(map) = &mut v {
        map.insert("windows".into(), json!(perf.windows));
        map.insert("availability".into(), json!(perf.availability));
    }
    v
}

/// Writes `results.json` and `report.html` into `dir`, creating it.
///
/// # Errors
/// The error from creating the directory or writing either file.
pub fn write(dir: &Path, report: &Report, perf: &Perf) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let results =
        serde_json::to_string_pretty(&results_json(report, perf)).map_err(io::Error::other)?;
    fs::write(dir.join("results.json"), results + "\n")?;
    fs::write(dir.join("report.html"), html(report, perf))
}

/// The fill colour of a fault kind (Jepsen's perf palette).
pub fn fault_colour(kind: &str) -> &'static str {
    match kind {
        "kill" => "#E9A4A0",
        "pause" => "#A0B1E9",
        k if k.contains("partition") => "#BDE9A0",
        _ => "#E9DCA0",
    }
}

fn kind_colour(kind: &str) -> &'static str {
    match kind {
        "ok" => "#81BFFC",
        "fail" => "#FF1E90",
        _ => "#FFA400",
    }
}

const F_COLOURS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

/// Plot frame: 900x300 with margins; maps data to pixels.
struct Frame {
    x_max_s: f64,
    y_min: f64,
    y_max: f64,
    log_y: bool,
}

const W: f64 = 900.0;
const H: f64 = 300.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 120.0;
const TOP: f64 = 20.0;
const BOTTOM: f64 = 40.0;

impl Frame {
    fn x(&self, s: f64) -> f64 {
        LEFT + (W - LEFT - RIGHT) * (s / self.x_max_s).clamp(0.0, 1.0)
    }

    fn y(&self, v: f64) -> f64 {
        let (v, lo, hi) = if self.log_y {
            (
                v.max(self.y_min).log10(),
                self.y_min.log10(),
                self.y_max.log10(),
            )
        } else {
            (v, self.y_min, self.y_max)
        };
        let frac = if hi > lo {
            ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        H - BOTTOM - (H - TOP - BOTTOM) * frac
    }

    fn open(&self, out: &mut String, title: &str, y_label: &str, windows: &[FaultWindow]) {
        let _ = write!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11"><text x="{LEFT}" y="14" font-size="13">{}</text>"#,
            escape(title)
        );
        for w in windows {
            let (x0, x1) = (
                self.x(w.start as f64 / NS_PER_S),
                self.x(w.end as f64 / NS_PER_S),
            );
            let _ = write!(
                out,
                r#"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{}" fill="{}" fill-opacity="0.6"><title>{} {:.1}s-{:.1}s</title></rect>"#,
                (x1 - x0).max(1.0),
                H - TOP - BOTTOM,
                fault_colour(&w.kind),
                escape(&w.kind),
                w.start as f64 / NS_PER_S,
                w.end as f64 / NS_PER_S
            );
        }
        let (x0, x1, y0, y1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
        let _ = write!(
            out,
            r#"<path d="M{x0} {y0}V{y1}H{x1}" stroke="black" fill="none"/><text x="{:.0}" y="{}" text-anchor="middle">time (s)</text><text x="14" y="{:.0}" transform="rotate(-90 14 {:.0})" text-anchor="middle">{}</text>"#,
            (x0 + x1) / 2.0,
            H - 6.0,
            (y0 + y1) / 2.0,
            (y0 + y1) / 2.0,
            escape(y_label)
        );
        for i in 0..=5 {
            let s = self.x_max_s * f64::from(i) / 5.0;
            let _ = write!(
                out,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{s:.1}</text>"#,
                self.x(s),
                y1 + 14.0
            );
        }
        for v in self.y_ticks() {
            let _ = write!(
                out,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                x0 - 4.0,
                self.y(v) + 4.0,
                trim_number(v)
            );
        }
    }

    fn y_ticks(&self) -> Vec<f64> {
        if self.log_y {
            let (lo, hi) = (
                self.y_min.log10().floor() as i32,
                self.y_max.log10().ceil() as i32,
            );
            (lo..=hi).map(|e| 10f64.powi(e)).collect()
        } else {
            (0..=4)
                .map(|i| self.y_min + (self.y_max - self.y_min) * f64::from(i) / 4.0)
                .collect()
        }
    }
}

fn trim_number(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn legend(out: &mut String, i: usize, colour: &str, label: &str) {
    let y = TOP + 14.0 * i as f64 + 6.0;
    let _ = write!(
        out,
        r#"<rect x="{}" y="{}" width="10" height="10" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
        W - RIGHT + 10.0,
        y - 9.0,
        W - RIGHT + 24.0,
        y,
        escape(label)
    );
}

/// Latency (ms, log scale) of each client op by invocation time, coloured by outcome.
pub fn latency_svg(perf: &Perf) -> String {
    let x_max_s = (perf.end as f64 / NS_PER_S).max(1e-3);
    let max_ms = perf
        .completions
        .iter()
        .map(|c| c.latency as f64 / 1e6)
        .fold(1.0, f64::max);
    // Round the top up to a power of ten so the top tick sits on the frame.
    let y_max = 10f64.powf(max_ms.log10().ceil());
    let frame = Frame {
        x_max_s,
        y_min: 0.01,
        y_max,
        log_y: true,
    };
    let mut out = String::new();
    frame.open(
        &mut out,
        "latency by invocation time",
        "latency (ms)",
        &perf.windows,
    );
    let mut picked: Vec<&Completion> = Vec::new();
    for kind in ["fail", "info", "ok"] {
        let of_kind: Vec<&Completion> =
            perf.completions.iter().filter(|c| c.kind == kind).collect();
        let room = LATENCY_POINTS_MAX.saturating_sub(picked.len());
        let stride = of_kind.len().div_ceil(room.max(1)).max(1);
        picked.extend(of_kind.into_iter().step_by(stride).take(room));
    }
    for c in picked {
        let _ = write!(
            out,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.5" fill="{}"/>"#,
            frame.x(c.invoked as f64 / NS_PER_S),
            frame.y(c.latency as f64 / 1e6),
            kind_colour(c.kind)
        );
    }
    for (i, kind) in ["ok", "fail", "info"].iter().enumerate() {
        legend(&mut out, i, kind_colour(kind), kind);
    }
    out.push_str("</svg>");
    out
}

/// Ok completions per second, one line per `f`.
pub fn throughput_svg(perf: &Perf) -> String {
    let seconds = (perf.end / 1_000_000_000) as usize + 1;
    let mut by_f: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for c in perf.completions.iter().filter(|c| c.kind == "ok") {
        let bucket = (c.invoked + c.latency) / 1_000_000_000;
        by_f.entry(&c.f).or_insert_with(|| vec![0; seconds])[bucket as usize] += 1;
    }
    let y_max = by_f.values().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let frame = Frame {
        x_max_s: seconds as f64,
        y_min: 0.0,
        y_max,
        log_y: false,
    };
    let mut out = String::new();
    frame.open(&mut out, "ok throughput by f", "ops/s", &perf.windows);
    for (i, (f, counts)) in by_f.iter().enumerate() {
        let colour = F_COLOURS[i % F_COLOURS.len()];
        let points: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(s, n)| format!("{:.1},{:.1}", frame.x(s as f64 + 0.5), frame.y(*n as f64)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#,
            points.join(" ")
        );
        legend(&mut out, i, colour, f);
    }
    out.push_str("</svg>");
    out
}

/// The whole report page.
pub fn html(report: &Report, perf: &Perf) -> String {
    let mut out = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>cellchat jepsen report</title>\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}pre{background:#f6f6f6;\
         padding:4px;white-space:pre-wrap}.bad{color:#c00}.good{color:#080}</style></head><body>",
    );
    let (class, verdict) = if report.valid {
        ("good", "VALID")
    } else {
        ("bad", "INVALID")
    };
    let _ = write!(out, "<h1 class=\"{class}\">{verdict}</h1>");
    for w in &report.warnings {
        let _ = write!(out, "<p><b>warning:</b> {}</p>", escape(w));
    }
    out.push_str("<h2>Anomalies</h2><table><tr><th>type</th><th>count</th><th>examples</th></tr>");
    for (name, summary) in &report.anomalies {
        let examples: Vec<String> = summary.examples.iter().map(|e| e.to_string()).collect();
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
            escape(name),
            summary.count,
            escape(&examples.join("\n"))
        );
    }
    out.push_str("</table><h2>Plots</h2>");
    out.push_str(&latency_svg(perf));
    out.push_str("<br>");
    out.push_str(&throughput_svg(perf));
    out.push_str("<h2>Availability of sends per fault window</h2><table><tr><th>window</th>\
                  <th>start (s)</th><th>end (s)</th><th>sends</th><th>ok</th><th>fraction</th></tr>");
    let secs =
        |t: Option<u64>| t.map_or(String::from("-"), |t| format!("{:.2}", t as f64 / NS_PER_S));
    for a in &perf.availability {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&a.window),
            secs(a.start),
            secs(a.end),
            a.sends,
            a.ok,
            a.fraction.map_or(String::from("-"), |f| format!("{f:.3}"))
        );
    }
    let stats = serde_json::to_string_pretty(&report.stats).expect("stats serialize: plain data");
    let _ = writeln!(
        out,
        "</table><h2>Stats</h2><pre>{}</pre></body></html>",
        escape(&stats)
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Prints the checker's verdict for a person at a terminal: counts, warnings, up to three
/// examples per anomaly found, and the VALID/INVALID line. `jepsen check` and `jepsen run`
/// both end with it.
pub(crate) fn print_summary(report: &Report) {
    let s = &report.stats;
    println!(
        "ops={} acknowledged_sends={} acknowledged_edits={} acknowledged_deletes={} \
         erased_read={} msgs_read={} recovered={} final_reads={} nodes={}",
        s.ops,
        s.acknowledged_sends,
        s.acknowledged_edits,
        s.acknowledged_deletes,
        s.erased_read,
        s.msgs_read,
        s.recovered,
        s.final_reads,
        s.nodes.join(",")
    );
    for (f, c) in &s.by_f {
        println!(
            "  {f}: invoke={} ok={} fail={} info={}",
            c.invoke, c.ok, c.fail, c.info
        );
    }
    for w in &report.warnings {
        println!("warning: {w}");
    }
    for anomaly in report.found() {
        let summary = &report.anomalies[anomaly.name()];
        println!("{}: {}", anomaly.name(), summary.count);
        for example in summary.examples.iter().take(3) {
            println!("  e.g. {example}");
        }
    }
    let failed = report.found().len();
    let verdict = if report.valid { "VALID" } else { "INVALID" };
    println!(
        "{verdict}: {} anomaly types checked, {failed} failed",
        crate::checker::Anomaly::ALL.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Op;

    fn sample() -> History {
        let ops = vec![
            Op::send(OpType::Invoke, 1, "c", "k1", "m1").at(0),
            Op::nemesis("kill", json!("n1")).at(1_000_000_000),
            Op::send(OpType::Ok, 1, "c", "k1", "m1")
                .with_seq(1)
                .at(1_500_000_000),
            Op::send(OpType::Invoke, 1, "c", "k2", "m2").at(1_600_000_000),
            Op::send(OpType::Info, 1, "c", "k2", "m2").at(1_900_000_000),
            Op::nemesis("start", json!("n1")).at(2_000_000_000),
            Op::nemesis("start-partition", json!({})).at(2_500_000_000),
        ];
        History::new(ops).expect("valid ops")
    }

    #[test]
    fn perf_pairs_ops_and_windows() {
        let perf = perf(&sample());
        assert_eq!(perf.completions.len(), 2);
        assert_eq!(perf.completions[0].latency, 1_500_000_000);
        let kinds: Vec<_> = perf.windows.iter().map(|w| w.kind.as_str()).collect();
        assert_eq!(kinds, ["kill", "partition"]);
        assert_eq!(
            perf.windows[1].end, 2_500_000_000,
            "an open window ends at the history end"
        );
        let kill = &perf.availability[0];
        assert_eq!((kill.sends, kill.ok), (1, 0));
        let none = perf.availability.last().expect("the outside row");
        assert_eq!((none.window.as_str(), none.sends, none.ok), ("none", 1, 1));
    }

    #[test]
    fn availability_outside_excludes_overlapping_windows_once() {
        let mut ops = Vec::new();
        for (i, t) in [0u64, 10, 20, 30, 40].into_iter().enumerate() {
            let (key, msg) = (format!("k{i}"), format!("m{i}"));
            let p = i as u64;
            ops.push(Op::send(OpType::Invoke, p, "c", &key, &msg).at(t));
            ops.push(Op::send(OpType::Fail, p, "c", &key, &msg).at(t + 1));
        }
        ops.push(Op::nemesis("kill", json!("n1")).at(5));
        ops.push(Op::nemesis("start-partition", json!({})).at(15));
        ops.push(Op::nemesis("start", json!("n1")).at(25));
        ops.push(Op::nemesis("stop-partition", json!({})).at(35));
        ops.sort_by_key(|o| o.time);
        let perf = perf(&History::new(ops).expect("valid ops"));
        let rows: Vec<(&str, u64)> = perf
            .availability
            .iter()
            .map(|a| (a.window.as_str(), a.sends))
            .collect();
        assert_eq!(rows, [("kill", 2), ("partition", 2), ("none", 2)]);
    }

    #[test]
    fn html_embeds_svg_with_fault_colour() {
        let history = sample();
        let page = html(&crate::checker::check(&history), &perf(&history));
        assert!(page.contains("<svg"));
        assert!(page.contains("#E9A4A0"));
    }
}
