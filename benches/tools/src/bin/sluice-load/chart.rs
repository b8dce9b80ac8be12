//! A small self-contained SVG chart: one panel per metric, one horizontal
//! bar per setup (the median over rounds) with a whisker from the lowest to
//! the highest round.

use std::fmt::Write as _;

/// One bar: label, median, min, max.
pub struct Bar {
    pub label: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub color: &'static str,
}

/// One panel: title, unit and bars.
pub struct Panel {
    pub title: String,
    pub unit: &'static str,
    pub bars: Vec<Bar>,
}

pub const COLORS: [&str; 7] = [
    "#6b7280", "#2563eb", "#dc2626", "#059669", "#d97706", "#f87171", "#b91c1c",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn format_value(value: f64) -> String {
    if value >= 100.0 {
        format!("{:.0}", value)
    } else if value >= 10.0 {
        format!("{:.1}", value)
    } else {
        format!("{:.2}", value)
    }
}

/// Renders the panels side by side, with a title and a footnote.
pub fn render(title: &str, footnote: &str, panels: &[Panel]) -> String {
    let panel_width = 360.0;
    let label_width = 95.0;
    let bar_height = 26.0;
    let gap = 10.0;
    let top = 70.0;
    let rows = panels.iter().map(|p| p.bars.len()).max().unwrap_or(0) as f64;
    let height = top + rows * (bar_height + gap) + 60.0;
    let width = panels.len() as f64 * (panel_width + label_width + 20.0) + 20.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="20" y="24" font-size="16" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (index, panel) in panels.iter().enumerate() {
        let x0 = 20.0 + index as f64 * (panel_width + label_width + 20.0);
        let scale_max = panel
            .bars
            .iter()
            .map(|b| b.max.max(b.median))
            .fold(0.0f64, f64::max)
            * 1.15;
        let scale = if scale_max > 0.0 {
            (panel_width - 10.0) / scale_max
        } else {
            0.0
        };
        let _ = writeln!(
            svg,
            r#"<text x="{x:.1}" y="52" font-size="13" font-weight="bold">{} ({})</text>"#,
            escape(&panel.title),
            escape(panel.unit),
            x = x0
        );
        let axis_x = x0 + label_width;
        let _ = writeln!(
            svg,
            r##"<line x1="{axis_x:.1}" y1="{y1:.1}" x2="{axis_x:.1}" y2="{y2:.1}" stroke="#111" stroke-width="1"/>"##,
            y1 = top - 6.0,
            y2 = top + rows * (bar_height + gap)
        );
        for (row, bar) in panel.bars.iter().enumerate() {
            let y = top + row as f64 * (bar_height + gap);
            let w = (bar.median * scale).max(0.0);
            let _ = writeln!(
                svg,
                r#"<text x="{lx:.1}" y="{ty:.1}" text-anchor="end">{}</text>"#,
                escape(&bar.label),
                lx = axis_x - 6.0,
                ty = y + bar_height * 0.65
            );
            let _ = writeln!(
                svg,
                r#"<rect x="{axis_x:.1}" y="{y:.1}" width="{w:.1}" height="{bar_height:.1}" fill="{}" opacity="0.85"/>"#,
                bar.color
            );
            let (wmin, wmax) = (axis_x + bar.min * scale, axis_x + bar.max * scale);
            let my = y + bar_height / 2.0;
            let _ = writeln!(
                svg,
                r##"<line x1="{wmin:.1}" y1="{my:.1}" x2="{wmax:.1}" y2="{my:.1}" stroke="#111" stroke-width="1.2"/><line x1="{wmin:.1}" y1="{a:.1}" x2="{wmin:.1}" y2="{b:.1}" stroke="#111"/><line x1="{wmax:.1}" y1="{a:.1}" x2="{wmax:.1}" y2="{b:.1}" stroke="#111"/>"##,
                a = my - 5.0,
                b = my + 5.0
            );
            let _ = writeln!(
                svg,
                r#"<text x="{tx:.1}" y="{ty:.1}">{}</text>"#,
                format_value(bar.median),
                tx = (axis_x + w).max(wmax) + 6.0,
                ty = y + bar_height * 0.65
            );
        }
    }
    let _ = writeln!(
        svg,
        r##"<text x="20" y="{y:.1}" font-size="11" fill="#444">{}</text>"##,
        escape(footnote),
        y = height - 20.0
    );
    svg.push_str("</svg>\n");
    svg
}
