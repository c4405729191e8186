//! Progress on stderr: a spinner for loading and decoding, a bar for the denoising steps.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub fn spinner(msg: &str) -> ProgressBar {
    let s = ProgressBar::new_spinner();
    s.set_message(msg.to_string());
    if std::io::stderr().is_terminal() {
        s.enable_steady_tick(Duration::from_millis(120));
    }
    s
}

/// `label` comes first ("pass 1/2 " in a two-pass run).
pub fn steps_bar(label: &str, total: u64) -> ProgressBar {
    bar(total, &format!("{label}denoising {{bar:30.cyan/blue}} {{pos}}/{{len}} steps {{msg}}"))
}

/// A bar over the frames of a video as they are decoded and written ("decoding and encoding").
pub fn frames_bar(what: &str, total: u64) -> ProgressBar {
    bar(total, &format!("{what} {{bar:30.cyan/blue}} {{pos}}/{{len}} frames"))
}

/// A bar of `total` in the style of every bar of the command line: `template`, then the time
/// elapsed and left.
fn bar(total: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!("{template} [{{elapsed_precise}} < {{eta_precise}} left]"))
            .expect("valid template")
            .progress_chars("█▉▊▋▌▍▎▏ "),
    );
    bar
}
