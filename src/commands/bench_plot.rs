//! `tpserve bench --plot`: charts with plotters, as SVG or PNG by the file's extension. A
//! single run: the distributions (CDFs) of TTFT, TPOT and end-to-end latency. A sweep: output
//! throughput against median TPOT and mean TTFT, one point per level.
//!
//! Text is laid out (and, in a PNG, drawn) with a font embedded in the binary, so a chart
//! looks the same on a machine without system fonts.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use tpserve_bench::metrics::Record;

const SIZE: (u32, u32) = (900, 540);

/// A chart that can be drawn on any plotters backend.
trait Chart {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static;
}

/// Draws `chart` into `path`: SVG for `.svg`, PNG for `.png`.
fn save(path: &Path, chart: &impl Chart) -> Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT)
            .map_err(|_| "the embedded font does not load".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))?;
    match Format::of(path)? {
        Format::Svg => {
            let root = SVGBackend::new(path, SIZE).into_drawing_area();
            chart.draw(&root)?;
            root.present()?;
        }
        Format::Png => {
            let root = BitMapBackend::new(path, SIZE).into_drawing_area();
            chart.draw(&root)?;
            root.present()?;
        }
    }
    Ok(())
}

/// The kinds of file a chart is drawn as.
pub enum Format {
    Svg,
    Png,
}

impl Format {
    /// By the file's extension (any case).
    pub fn of(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => bail!("charts are drawn as .svg or .png"),
        }
    }
}

/// Empirical CDFs of the successful requests' latencies, in ms.
pub fn latencies(path: &Path, records: &[Record]) -> Result<()> {
    let ok: Vec<&Record> = records.iter().filter(|r| r.ok()).collect();
    let series: [(&str, Vec<f64>, RGBColor); 3] = [
        ("TTFT", ok.iter().map(|r| r.ttft * 1e3).collect(), BLUE),
        ("TPOT", ok.iter().filter_map(|r| r.tpot()).map(|t| t * 1e3).collect(), RED),
        ("E2EL", ok.iter().map(|r| r.e2el * 1e3).collect(), GREEN),
    ];
    save(path, &Cdfs { series, n_ok: ok.len() })
}

struct Cdfs<'a> {
    series: [(&'a str, Vec<f64>, RGBColor); 3],
    n_ok: usize,
}

impl Chart for Cdfs<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let (series, n_ok) = (&self.series, self.n_ok);
        let xmax = series.iter().flat_map(|s| s.1.iter().copied()).fold(1.0, f64::max) * 1.05;
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(format!("latency distributions ({n_ok} requests)"), ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..xmax, 0.0..1.0)?;
        chart.configure_mesh().x_desc("ms").y_desc("fraction of requests").draw()?;
        for (name, v, color) in series {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            let n = v.len().max(1) as f64;
            let points: Vec<(f64, f64)> = v.iter().enumerate().map(|(i, &x)| (x, (i + 1) as f64 / n)).collect();
            let color = *color;
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        Ok(())
    }
}

/// Throughput against latency over a sweep's levels.
pub fn sweep(path: &Path, param: &str, values: &[f64], results: &[serde_json::Value]) -> Result<()> {
    save(path, &Sweep { param, values, results })
}

struct Sweep<'a> {
    param: &'a str,
    values: &'a [f64],
    results: &'a [serde_json::Value],
}

impl Chart for Sweep<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let Sweep { param, values, results } = *self;
        let get = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(0.0);
        let tput: Vec<f64> = results.iter().map(|r| get(r, "output_throughput")).collect();
        let curves = [("median TPOT (ms)", "median_tpot_ms", RED), ("mean TTFT (ms)", "mean_ttft_ms", BLUE)];
        let xmax = tput.iter().copied().fold(1.0, f64::max) * 1.1;
        let ymax = results.iter().flat_map(|r| curves.iter().map(move |c| get(r, c.1))).fold(1.0, f64::max) * 1.1;
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(format!("throughput vs latency, {param} = {}", values.iter().map(f64::to_string).collect::<Vec<_>>().join(", ")), ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
        chart.configure_mesh().x_desc("output tokens/s").y_desc("ms").draw()?;
        for (name, key, color) in curves {
            let points: Vec<(f64, f64)> = results.iter().zip(&tput).map(|(r, &x)| (x, get(r, key))).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(points.iter().zip(values).map(|(&(x, y), v)| {
                EmptyElement::at((x, y)) + Circle::new((0, 0), 4, color.filled()) + Text::new(format!("{v}"), (6, -14), ("sans-serif", 14))
            }))?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        Ok(())
    }
}
