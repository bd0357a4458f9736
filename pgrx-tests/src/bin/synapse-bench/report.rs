//! The report: the settings, every figure with its ratios to the baselines
//! measured in the run, the targets, and the same as JSON.
use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::figure::{formatted, Baseline, Figure};
use crate::options::{Options, Section};
use crate::targets;

/// Each ratio of `figure` to a baseline measured in this run.
fn ratios(figure: &Figure, baselines: &BTreeMap<Baseline, f64>) -> Vec<(f64, Baseline)> {
    figure
        .versus
        .iter()
        .filter_map(|&baseline| {
            let base = *baselines.get(&baseline)?;
            (base > 0.0).then(|| (figure.value / base, baseline))
        })
        .collect()
}

pub fn print(figures: &[(Section, Figure)], options: &Options, settings: &[&str]) {
    let baselines: BTreeMap<Baseline, f64> = figures
        .iter()
        .filter_map(|(_, figure)| Some((figure.is?, figure.value)))
        .collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "Postgres settings, the same for Synapse and its peer: {}",
        settings.join(", ")
    );
    println!(
        "synchronous_commit on (the default); {cores} cores; median of {} run(s)",
        options.runs
    );
    let ratio_texts: Vec<String> = figures
        .iter()
        .map(|(_, figure)| {
            ratios(figure, &baselines)
                .into_iter()
                .map(|(value, baseline)| format!("{}× {}", formatted(value, 3), baseline.label()))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect();
    let width = figures
        .iter()
        .map(|(_, figure)| figure.name.chars().count())
        .max()
        .unwrap_or(6);
    let ratio_width = ratio_texts
        .iter()
        .map(|text| text.chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    println!();
    println!(
        "{:<width$} {:>11} {:<8} {:<ratio_width$} note",
        "figure", "value", "unit", "ratio"
    );
    let mut json_figures = BTreeMap::new();
    let mut previous = None;
    for ((section, figure), ratio_text) in figures.iter().zip(&ratio_texts) {
        if previous != Some(*section) {
            println!(
                "{:-<1$}",
                format!("-- {} ", section.name()),
                width + ratio_width + 34
            );
            previous = Some(*section);
        }
        println!(
            "{:<width$} {:>11} {:<8} {:<ratio_width$} {}",
            figure.name,
            formatted(figure.value, 4),
            figure.unit,
            ratio_text,
            figure.note
        );
        let ratios: Vec<Value> = ratios(figure, &baselines)
            .into_iter()
            .map(|(value, baseline)| json!({"value": value, "of": baseline.label()}))
            .collect();
        json_figures.insert(
            figure.name.clone(),
            json!({
                "section": section.name(),
                "value": figure.value,
                "unit": figure.unit,
                "note": figure.note,
                "ratios": ratios,
            }),
        );
    }
    let measured: Vec<&Figure> = figures.iter().map(|(_, figure)| figure).collect();
    let targets = targets::print(&measured, &baselines, options.quick);
    if let Some(path) = &options.json {
        let document: Value = json!({
            "runs": options.runs,
            "quick": options.quick,
            "settings": settings,
            "cores": cores,
            "sections": options.only.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "figures": json_figures,
            "targets": targets,
        });
        std::fs::write(path, serde_json::to_string_pretty(&document).unwrap())
            .expect("writing the JSON");
        println!("\nwritten to {path}");
    }
}
