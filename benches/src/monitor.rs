//! Watches a run once a second: a sample for the timeline and the plot, the relay's memory
//! when the bench started it, and a live progress bar with the current rate, errors and
//! p99.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

use crate::stats::{Sample, Tally};

/// A running monitor; [`Monitor::finish`] stops it and hands back the timeline.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<Sample>>,
}

impl Monitor {
    /// Starts sampling `tally` (and the relay process `relay_pid`, if any) for a run of
    /// `length`.
    pub fn start(tally: Arc<Tally>, relay_pid: Option<u32>, length: Duration, label: &str) -> Self {
        let bar = ProgressBar::new(length.as_secs().max(1));
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} s  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_owned());
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(watch(tally, relay_pid, bar, stop.clone()));
        Monitor { stop, task }
    }

    pub async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

async fn watch(
    tally: Arc<Tally>,
    relay_pid: Option<u32>,
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut samples = Vec::new();
    let mut last_delivered = Tally::count(&tally.delivered);
    let mut last_at = start;
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        let now = Instant::now();
        let delivered = Tally::count(&tally.delivered);
        let per_s = (delivered - last_delivered) as f64 / (now - last_at).as_secs_f64();
        (last_delivered, last_at) = (delivered, now);
        let latency = tally.take_interval();
        let rss = relay_pid.and_then(|pid| crate::child::process_rss_bytes(pid).ok());
        bar.set_position((now - start).as_secs());
        bar.set_message(format!(
            "{per_s:>9.0} msgs/s  errors {}  p99 {:.2} ms{}",
            Tally::count(&tally.failed),
            latency.p99,
            rss.map(|bytes| format!("  relay RSS {} MiB", bytes >> 20))
                .unwrap_or_default()
        ));
        samples.push(Sample {
            at_s: (now - start).as_secs_f64(),
            delivered_per_s: per_s,
            latency_ms: latency,
            relay_rss_bytes: rss,
        });
    }
    bar.finish_and_clear();
    samples
}
