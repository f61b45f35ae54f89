//! The end of a run: merged figures, the table, the JSON summary, the `.hgrm`
//! percentile distribution and the SVG plot.

use crate::coordinator::RunArgs;
use crate::plan::{Counters, WorkerResult};
use crate::scrape::Sample;
use crate::worker::{decode_hist, histogram};
use hdrhistogram::Histogram;
use serde_json::json;
use std::path::Path;

pub struct Summary {
    pub counters: Counters,
    pub latency: Histogram<u64>,
    /// Per second: (sent, delivered), summed over workers.
    pub timeline: Vec<(u64, u64)>,
    pub json: serde_json::Value,
}

pub(crate) fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50": h.value_at_quantile(0.50),
        "p95": h.value_at_quantile(0.95),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": h.mean().round(),
        "count": h.len(),
    })
}

pub(crate) fn delta(a: Option<&Sample>, b: Option<&Sample>, name: &str) -> Option<f64> {
    Some(b?.get(name)? - a?.get(name)?)
}

impl Summary {
    pub fn build(
        args: &RunArgs,
        results: &[WorkerResult],
        before: Option<&Sample>,
        connected: Option<&Sample>,
        warm: Option<&Sample>,
        after: Option<&Sample>,
    ) -> anyhow::Result<Summary> {
        let mut c = Counters::default();
        let mut latency = histogram();
        let mut by_hops = [histogram(), histogram(), histogram()];
        let mut ack_latency = histogram();
        let mut send_lag = histogram();
        let mut reconnect_time = histogram();
        let mut longest_delivery_us = 0;
        let mut timeline: Vec<(u64, u64)> = Vec::new();
        for r in results {
            c.add(&r.counters);
            latency.add(decode_hist(&r.latency)?)?;
            for (h, enc) in by_hops.iter_mut().zip(&r.latency_by_hops) {
                h.add(decode_hist(enc)?)?;
            }
            ack_latency.add(decode_hist(&r.ack_latency)?)?;
            if !r.send_lag.is_empty() {
                send_lag.add(decode_hist(&r.send_lag)?)?;
            }
            if !r.reconnect_time.is_empty() {
                reconnect_time.add(decode_hist(&r.reconnect_time)?)?;
            }
            longest_delivery_us = longest_delivery_us.max(r.longest_delivery_us);
            if timeline.len() < r.timeline.len() {
                timeline.resize(r.timeline.len(), (0, 0));
            }
            for (i, (s, d)) in r.timeline.iter().enumerate() {
                timeline[i].0 += s;
                timeline[i].1 += d;
            }
        }
        // Counts and rates cover all sending, warm-up included; latencies only the measured window.
        let sending = args.warmup + args.duration;
        let secs = sending.as_secs_f64().max(1e-3);
        // Seconds after the sending window hold only stragglers: keep the plot to the window.
        timeline.truncate(sending.as_secs().max(1) as usize);
        // Server cost, from the gateway's own counters over the measured window.
        let from = if args.warmup.is_zero() { connected } else { warm };
        let cpu = delta(from, after, "process_cpu_seconds_total");
        let deliveries = delta(from, after, "switchboard_deliveries_total");
        let stored = delta(from, after, "switchboard_messages_stored_total");
        let entries = delta(from, after, "switchboard_fleet_entries_sent_total");
        // Group commit: how many commits, how full, and how much of the window the
        // store's commit held (summed over sequencer partitions: above 1 they overlap).
        let commits = delta(from, after, "switchboard_commit_seconds_count");
        let committing = delta(from, after, "switchboard_commit_seconds_sum");
        let batched = delta(from, after, "switchboard_commit_batch_size_sum");
        let window = if args.warmup.is_zero() { secs } else { args.duration.as_secs_f64().max(1e-3) };
        let rss_growth = delta(before, connected, "process_resident_memory_bytes");
        let conns = delta(before, connected, "switchboard_connections");
        let per = |num: Option<f64>, den: Option<f64>| match (num, den) {
            (Some(n), Some(d)) if d > 0.0 => json!((n / d * 100.0).round() / 100.0),
            _ => serde_json::Value::Null,
        };
        let json = json!({
            "target": args.target,
            "scenario": format!("{:?}", args.scenario).to_lowercase(),
            "group_size": args.group_size,
            "rate": args.rate,
            "duration_s": args.duration.as_secs_f64(),
            "warmup_s": args.warmup.as_secs_f64(),
            "message_size": args.message_size,
            "idle_fraction": args.idle_fraction,
            "connections": c.connections,
            "connected": c.connected,
            "connect_errors": c.connect_errors,
            "sent": c.sent,
            "acked": c.acked,
            "send_errors": c.send_errors,
            "delivered": c.delivered,
            "lost": c.lost,
            "duplicates": c.duplicates,
            "out_of_order": c.out_of_order,
            "disconnects": c.disconnects,
            "reconnects": c.reconnects,
            "redelivered": c.redelivered,
            "resent": c.resent,
            "unanswered": c.unanswered,
            "cross_node": args.cross_node,
            "sent_per_s": (c.sent as f64 / secs).round(),
            "delivered_per_s": (c.delivered as f64 / secs).round(),
            "latency_us": percentiles(&latency),
            "latency_by_hops_us": by_hops.iter().map(percentiles).collect::<Vec<_>>(),
            "ack_latency_us": percentiles(&ack_latency),
            "send_lag_us": percentiles(&send_lag),
            "reconnect_us": percentiles(&reconnect_time),
            "longest_delivery_gap_us": longest_delivery_us,
            "gateway": {
                "cpu_us_per_delivery": per(cpu.map(|v| v * 1e6), deliveries),
                "cpu_us_per_message": per(cpu.map(|v| v * 1e6), stored),
                "fleet_entries_per_message": per(entries, stored),
                "commits_per_s": per(commits, Some(window)),
                "commands_per_commit": per(batched, commits),
                "commit_busy": per(committing, Some(window)),
                "rss_bytes": after.and_then(|a| a.get("process_resident_memory_bytes")).copied(),
                "rss_per_connection_bytes": per(rss_growth, conns),
            },
        });
        let mut json = json;
        json["files"] = json!({
            "share": args.attachment_share,
            "size": args.attachment_size,
            "fetched_by_recipients": !args.attachment_no_fetch,
            "sends": c.attachments,
            "uploads": c.uploads,
            "upload_bytes": c.upload_bytes,
            "upload_errors": c.upload_errors,
            "uploads_skipped": c.uploads_skipped,
            "downloads": c.downloads,
            "download_errors": c.download_errors,
            "downloads_skipped": c.downloads_skipped,
        });
        Ok(Summary { counters: c, latency, timeline, json })
    }
}

pub fn print_table(s: &Summary) {
    let j = &s.json;
    let ms =
        |v: &serde_json::Value| v.as_u64().map(|us| format!("{:.3}", us as f64 / 1000.0)).unwrap_or_default();
    // One row of percentiles, in milliseconds.
    let cells = |p: &serde_json::Value| {
        format!(
            "{:>9} {:>9} {:>9} {:>9} {:>9}",
            ms(&p["p50"]),
            ms(&p["p95"]),
            ms(&p["p99"]),
            ms(&p["p999"]),
            ms(&p["max"])
        )
    };
    println!();
    println!(
        "  connections      {:>12} ({} connected, {} errors)",
        j["connections"], j["connected"], j["connect_errors"]
    );
    println!("  sent / acked     {:>12} / {}   ({} send errors)", j["sent"], j["acked"], j["send_errors"]);
    println!("  delivered        {:>12}   ({}/s)", j["delivered"], j["delivered_per_s"]);
    println!("  lost             {:>12}", j["lost"]);
    println!("  duplicates       {:>12}", j["duplicates"]);
    println!("  out of order     {:>12}", j["out_of_order"]);
    if j["reconnects"].as_u64().unwrap_or(0) + j["disconnects"].as_u64().unwrap_or(0) > 0 {
        println!(
            "  disconnects      {:>12}   ({} reconnects, {} seen again and dropped, {} sends sent again, {} never answered)",
            j["disconnects"], j["reconnects"], j["redelivered"], j["resent"], j["unanswered"]
        );
    }
    let f = &j["files"];
    if f["share"].as_f64().unwrap_or(0.0) > 0.0 {
        println!(
            "  with files       {:>12}   ({} uploads of {} bytes, {} failed, {} skipped: too many in flight)",
            f["sends"], f["uploads"], f["size"], f["upload_errors"], f["uploads_skipped"]
        );
        println!(
            "  files fetched    {:>12}   ({} failed, {} skipped: too many in flight)",
            f["downloads"], f["download_errors"], f["downloads_skipped"]
        );
    }
    println!();
    if let Some(w) = j["warmup_s"].as_f64().filter(|w| *w > 0.0) {
        println!("  latency (ms), after the {w} s warm-up; gateway cost likewise");
    }
    println!("  latency (ms)         p50       p95       p99     p99.9       max");
    for (name, key) in [
        ("  send→deliver   ", "latency_us"),
        ("  send→ack       ", "ack_latency_us"),
        ("  send lag       ", "send_lag_us"),
    ] {
        println!("{name}{}", cells(&j[key]));
    }
    // By hops, when some messages crossed nodes.
    let hops = ["  0 hops (1 node)", "  1 hop          ", "  2 hops         "];
    if let Some(list) = j["latency_by_hops_us"].as_array()
        && list.iter().skip(1).any(|p| p["count"].as_u64().unwrap_or(0) > 0)
    {
        println!("  send→deliver by node-to-node hops (count)");
        for (name, p) in hops.iter().zip(list) {
            if p["count"].as_u64().unwrap_or(0) == 0 {
                continue;
            }
            println!("{name}{}   ({})", cells(p), p["count"]);
        }
    }
    if j["reconnect_us"]["count"].as_u64().unwrap_or(0) > 0 {
        let p = &j["reconnect_us"];
        println!("  reconnect      {}   ({}; drop to sync done)", cells(p), p["count"]);
    }
    println!(
        "  longest delivery gap {} ms (the longest any recipient waited for a message, warm-up included)",
        ms(&j["longest_delivery_gap_us"])
    );
    let g = &j["gateway"];
    println!();
    println!("  gateway CPU per delivery   {} µs", g["cpu_us_per_delivery"]);
    println!("  gateway CPU per message    {} µs", g["cpu_us_per_message"]);
    println!("  gateway RSS per connection {} bytes", g["rss_per_connection_bytes"]);
    println!(
        "  store commits              {}/s, {} commands each, busy {} of the window",
        g["commits_per_s"], g["commands_per_commit"], g["commit_busy"]
    );
    if !g["fleet_entries_per_message"].is_null() {
        println!("  stream entries per message {}", g["fleet_entries_per_message"]);
    }
    let l = &j["loadgen"];
    if !l.is_null() {
        let mb = |v: &serde_json::Value| v.as_f64().map_or("?".into(), |b| format!("{:.0}", b / 1e6));
        println!(
            "  loadgen RSS per connection {} bytes ({} workers, {} MB in all, peak {} MB; coordinator {} MB)",
            l["rss_per_connection_bytes"],
            l["workers"],
            mb(&l["workers_rss_bytes"]),
            mb(&l["workers_peak_rss_bytes"]),
            mb(&l["coordinator_rss_bytes"])
        );
    }
    println!();
}

/// The classic HdrHistogram percentile distribution, values in milliseconds.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 { format!("{:.2}", 1.0 / (1.0 - q)) } else { String::new() };
        out.push_str(&format!(
            "{:>12.3} {:>14.12} {:>10} {:>14}\n",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inv
        ));
    }
    out.push_str(&format!(
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]\n#[Buckets = {:>12}, SubBuckets     = {:>12}]\n",
        h.mean() / 1000.0,
        h.stdev() / 1000.0,
        h.max() as f64 / 1000.0,
        h.len(),
        h.buckets(),
        h.distinct_values()
    ));
    out
}

/// Two panels: the latency percentile curve (log scale of 1/(1-p)), and rates over time.
pub fn svg(path: &Path, s: &Summary) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(400);

    let points: Vec<(f64, f64)> = s
        .latency
        .iter_quantiles(5)
        .filter(|v| v.quantile_iterated_to() < 0.99999)
        .map(|v| (1.0 / (1.0 - v.quantile_iterated_to()), v.value_iterated_to() as f64 / 1000.0))
        .collect();
    let ymax = points.iter().map(|p| p.1).fold(0.1, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption("send→deliver latency by percentile", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1.0f64..100_000.0).log_scale(), 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_label_formatter(&|x| format!("{:.3}%", 100.0 * (1.0 - 1.0 / x)))
        .draw()?;
    chart.draw_series(LineSeries::new(points, &BLUE))?;

    let secs = s.timeline.len().max(1) as f64;
    let rmax = s.timeline.iter().map(|t| t.0.max(t.1)).max().unwrap_or(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("rates over time (per second)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..secs, 0.0..rmax.max(1.0))?;
    chart.configure_mesh().x_desc("seconds").y_desc("messages/s").draw()?;
    chart
        .draw_series(LineSeries::new(
            s.timeline.iter().enumerate().map(|(i, t)| (i as f64, t.0 as f64)),
            &RED,
        ))?
        .label("sent")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(LineSeries::new(
            s.timeline.iter().enumerate().map(|(i, t)| (i as f64, t.1 as f64)),
            &BLUE,
        ))?
        .label("delivered")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
