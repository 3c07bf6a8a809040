//! The figures of a messaging run: the terminal table, the JSON file and the SVG plot.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde::Serialize;

use crate::stats::{Counts, Percentiles, Sample};

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    /// What carried the messages: `hush`, `nats-jetstream`, `mosquitto`.
    pub system: String,
    /// When the system acknowledges a send, in its own terms.
    pub durability: String,
    pub config: serde_json::Value,
    pub duration_s: f64,
    #[serde(flatten)]
    pub counts: Counts,
    pub relay: Option<RelayFigures>,
    /// The bench's own CPU over the measured window, in cores.
    pub bench_cpu_cores: f64,
    pub timeline: Vec<Sample>,
    /// Whether the plaintext canary turned up in the relay's files (None: not checked).
    pub canary_found: Option<bool>,
}

/// What the bench measured of a relay it started itself.
#[derive(Debug, Default, Serialize)]
pub struct RelayFigures {
    /// CPU over the measured window, in cores.
    pub cpu_cores: f64,
    pub rss_peak_bytes: u64,
    pub rss_end_bytes: u64,
    /// Bytes of the data directory at the end.
    pub store_bytes: u64,
    pub fsyncs_per_s: Option<f64>,
    pub writes_per_fsync: Option<f64>,
}

impl Report {
    pub fn print(&self) {
        println!(
            "{} through {} ({}), {:.1} s",
            self.scenario, self.system, self.durability, self.duration_s
        );
        println!(
            "  sent (acknowledged) {:>10}   failed sends {:>6}",
            self.counts.sent, self.counts.failed
        );
        println!(
            "  delivered           {:>10}   lost {}   duplicated {}",
            self.counts.delivered, self.counts.lost, self.counts.duplicated
        );
        println!(
            "  delivered msgs/s    {:>10.0}",
            self.counts.delivered_per_s
        );
        let l = &self.counts.latency_ms;
        println!(
            "  send->deliver ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50, l.p90, l.p99, l.p99_9, l.max
        );
        if let Some(relay) = &self.relay {
            println!(
                "  relay               CPU {:.2} cores  RSS peak {:.1} MiB, end {:.1} MiB  \
                 store {:.1} MiB",
                relay.cpu_cores,
                mib(relay.rss_peak_bytes),
                mib(relay.rss_end_bytes),
                mib(relay.store_bytes)
            );
            if let (Some(fsyncs), Some(writes)) = (relay.fsyncs_per_s, relay.writes_per_fsync) {
                println!(
                    "  group commit        {fsyncs:.0} fsyncs/s, {writes:.1} writes per fsync"
                );
            }
        }
        println!(
            "  bench               CPU {:.2} cores",
            self.bench_cpu_cores
        );
    }
}

impl Report {
    /// The run's outcome for the exit code: a lost or duplicated message, or a canary in
    /// the relay's files, fails it.
    pub fn verdict(&self) -> anyhow::Result<()> {
        if self.counts.lost > 0 || self.counts.duplicated > 0 {
            anyhow::bail!(
                "{}: {} acknowledged messages lost, {} duplicated",
                self.system,
                self.counts.lost,
                self.counts.duplicated
            );
        }
        if self.canary_found == Some(true) {
            anyhow::bail!("the plaintext canary is in the relay's files");
        }
        Ok(())
    }
}

/// Several runs side by side.
pub fn print_table(reports: &[Report]) {
    println!(
        "\n{:<16} {:>10} {:>7} {:>5} {:>8} {:>8} {:>9} {:>10}  acknowledges",
        "system", "msgs/s", "lost", "dup", "p50 ms", "p99 ms", "p99.9 ms", "CPU cores"
    );
    for r in reports {
        println!(
            "{:<16} {:>10.0} {:>7} {:>5} {:>8.2} {:>8.2} {:>9.2} {:>10}  {}",
            r.system,
            r.counts.delivered_per_s,
            r.counts.lost,
            r.counts.duplicated,
            r.counts.latency_ms.p50,
            r.counts.latency_ms.p99,
            r.counts.latency_ms.p99_9,
            r.relay
                .as_ref()
                .map_or("-".to_owned(), |relay| format!("{:.2}", relay.cpu_cores)),
            r.durability
        );
    }
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn write_json(path: &Path, reports: &[Report]) -> anyhow::Result<()> {
    let json = if let [one] = reports {
        serde_json::to_value(one)?
    } else {
        serde_json::to_value(reports)?
    };
    std::fs::write(path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Throughput (top) and latency percentiles (bottom) over time, one line per system for
/// throughput.
pub fn plot(path: &Path, reports: &[Report]) -> anyhow::Result<()> {
    let Some(first) = reports.first() else {
        return Ok(());
    };
    let root = SVGBackend::new(path, (960, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (top, bottom) = root.split_vertically(340);
    let end_s = reports
        .iter()
        .filter_map(|r| r.timeline.last().map(|s| s.at_s))
        .fold(1.0f64, f64::max);

    let max_rate = reports
        .iter()
        .flat_map(|r| r.timeline.iter().map(|s| s.delivered_per_s))
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("{}: delivered messages per second", first.scenario),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end_s, 0.0..max_rate * 1.1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("msgs/s")
        .draw()
        .map_err(plot_error)?;
    for (index, report) in reports.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(
                report.timeline.iter().map(|s| (s.at_s, s.delivered_per_s)),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(report.system.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(plot_error)?;

    let max_latency = first
        .timeline
        .iter()
        .map(|s| s.latency_ms.p99_9)
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            format!(
                "{}: send→deliver latency through {}",
                first.scenario, first.system
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end_s, 0.0..max_latency * 1.1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .draw()
        .map_err(plot_error)?;
    let lines: [(&str, Pick); 4] = [
        ("p50", |p| p.p50),
        ("p90", |p| p.p90),
        ("p99", |p| p.p99),
        ("p99.9", |p| p.p99_9),
    ];
    for (index, (name, pick)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(index + 4).to_rgba();
        chart
            .draw_series(LineSeries::new(
                first.timeline.iter().map(|s| (s.at_s, pick(&s.latency_ms))),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Picks one percentile.
type Pick = fn(&Percentiles) -> f64;

fn plot_error<E: std::fmt::Display>(error: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {error}")
}
