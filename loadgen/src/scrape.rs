//! Reads the gateway's Prometheus text exposition.

use std::collections::HashMap;

/// Metric samples by name (with labels, as written), e.g. `process_cpu_seconds_total`.
pub type Sample = HashMap<String, f64>;

pub fn scrape(url: &str) -> anyhow::Result<Sample> {
    let text = ureq::get(url).call()?.body_mut().read_to_string()?;
    Ok(parse(&text))
}

pub fn parse(text: &str) -> Sample {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_exposition() {
        let s = super::parse(
            "# HELP x y\nx_total 3\nh_bucket{le=\"0.1\"} 2\nprocess_resident_memory_bytes 1.5e7\n",
        );
        assert_eq!(s["x_total"], 3.0);
        assert_eq!(s["h_bucket{le=\"0.1\"}"], 2.0);
        assert_eq!(s["process_resident_memory_bytes"], 1.5e7);
    }
}
