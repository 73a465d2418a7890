//! The cellchat command-line client's parts: the full-screen chat ([`tui`]), the line mode
//! ([`interactive`], [`lineedit`]), the commands both run ([`actions`], [`command`]) and how messages are
//! printed ([`output`], [`timefmt`]), typing indicators ([`typing`]). The `cellchat` binary (`main.rs`) chooses among them; the
//! library exists so benchmarks can drive the screen without a terminal.

pub mod actions;
pub mod command;
pub mod interactive;
pub mod lineedit;
pub mod marks;
pub mod output;
pub mod timefmt;
pub mod tui;
pub mod typing;
