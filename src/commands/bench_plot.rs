//! `tpserve bench --plot`: SVG charts with plotters. A single run: the distributions (CDFs)
//! of TTFT, TPOT and end-to-end latency. A sweep: output throughput against median TPOT and
//! mean TTFT, one point per level.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use tpserve_bench::metrics::Record;

fn svg(path: &Path) -> Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => Ok(()),
        _ => Err(anyhow!("only .svg charts are drawn")),
    }
}

/// Empirical CDFs of the successful requests' latencies, in ms.
pub fn latencies(path: &Path, records: &[Record]) -> Result<()> {
    svg(path)?;
    let ok: Vec<&Record> = records.iter().filter(|r| r.ok()).collect();
    let series: [(&str, Vec<f64>, RGBColor); 3] = [
        ("TTFT", ok.iter().map(|r| r.ttft * 1e3).collect(), BLUE),
        ("TPOT", ok.iter().filter_map(|r| r.tpot()).map(|t| t * 1e3).collect(), RED),
        ("E2EL", ok.iter().map(|r| r.e2el * 1e3).collect(), GREEN),
    ];
    let xmax = series.iter().flat_map(|s| s.1.iter().copied()).fold(1.0, f64::max) * 1.05;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("latency distributions ({} requests)", ok.len()), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..xmax, 0.0..1.0)?;
    chart.configure_mesh().x_desc("ms").y_desc("fraction of requests").draw()?;
    for (name, mut v, color) in series {
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let points: Vec<(f64, f64)> = v.iter().enumerate().map(|(i, &x)| (x, (i + 1) as f64 / n)).collect();
        chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?.label(name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// Throughput against latency over a sweep's levels.
pub fn sweep(path: &Path, param: &str, values: &[f64], results: &[serde_json::Value]) -> Result<()> {
    svg(path)?;
    let get = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    let tput: Vec<f64> = results.iter().map(|r| get(r, "output_throughput")).collect();
    let curves = [("median TPOT (ms)", "median_tpot_ms", RED), ("mean TTFT (ms)", "mean_ttft_ms", BLUE)];
    let xmax = tput.iter().copied().fold(1.0, f64::max) * 1.1;
    let ymax = results.iter().flat_map(|r| curves.iter().map(move |c| get(r, c.1))).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("throughput vs latency, {param} = {values:?}"), ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
    chart.configure_mesh().x_desc("output tokens/s").y_desc("ms").draw()?;
    for (name, key, color) in curves {
        let points: Vec<(f64, f64)> = results.iter().zip(&tput).map(|(r, &x)| (x, get(r, key))).collect();
        chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?.label(name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(points.iter().zip(values).map(|(&(x, y), v)| {
            EmptyElement::at((x, y)) + Circle::new((0, 0), 4, color.filled()) + Text::new(format!("{v}"), (6, -14), ("sans-serif", 14))
        }))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
