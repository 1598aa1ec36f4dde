//! Human output: sizes, durations, progress bars (only on a terminal, never with --json).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// A progress bar fed from counters, or nothing when stderr is not a terminal or --json.
pub struct Bar {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Bar {
    pub fn start(enabled: bool, label: &'static str, get: impl Fn() -> (u64, u64) + Send + 'static) -> Bar {
        if !enabled || !std::io::stderr().is_terminal() {
            return Bar { stop: None, task: None };
        }
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb.set_message(label);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                let (done, total) = get();
                pb.set_length(total);
                pb.set_position(done);
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                    _ = &mut rx => break,
                }
            }
            pb.finish_and_clear();
        });
        Bar { stop: Some(tx), task: Some(task) }
    }

    pub async fn finish(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// A spinner naming what is in progress, or nothing when stderr is not a terminal or --json.
pub fn spinner(enabled: bool, get: impl Fn() -> String + Send + 'static) -> Bar {
    if !enabled || !std::io::stderr().is_terminal() {
        return Bar { stop: None, task: None };
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"));
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        loop {
            pb.set_message(get());
            pb.tick();
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                _ = &mut rx => break,
            }
        }
        pb.finish_and_clear();
    });
    Bar { stop: Some(tx), task: Some(task) }
}

/// `println!` that never panics: a closed stdout (`| head`) ends the process quietly.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(141);
        }
    }};
}

/// `print!` that never panics.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if write!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(141);
        }
    }};
}
