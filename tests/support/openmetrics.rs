//! A strict reader of the OpenMetrics text format (the subset prometheus-client writes), so
//! tests can assert on exact values and on the format itself.
#![allow(dead_code)]

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name -> type (counter, gauge, histogram, info, ...).
    pub types: BTreeMap<String, String>,
    pub help: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample with this name and exactly these labels (0 when absent, as
    /// Prometheus treats a series that has not appeared yet).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map_or(0.0, |s| s.value)
    }

    /// The sum over the samples with this name whose labels include these (whatever their
    /// other labels), e.g. API requests of one verb and resource, whatever the answer.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
            })
            .map(|s| s.value)
            .sum()
    }
}

/// Parses and validates; panics with the offending line on any deviation.
pub fn parse(text: &str) -> Exposition {
    let mut out = Exposition::default();
    assert!(text.ends_with("# EOF\n"), "exposition must end with # EOF");
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" {
            assert!(lines.peek().is_none(), "content after # EOF");
            break;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, value) = (parts.next(), parts.next(), parts.next());
            let (Some(kind), Some(name)) = (kind, name) else {
                panic!("bad metadata line: {line}");
            };
            assert!(valid_name(name), "bad metric name in: {line}");
            match kind {
                "TYPE" => {
                    let t = value.unwrap_or_else(|| panic!("TYPE without type: {line}"));
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "info",
                            "summary",
                            "unknown",
                            "stateset",
                            "gaugehistogram"
                        ]
                        .contains(&t),
                        "unknown type: {line}"
                    );
                    assert!(
                        out.types.insert(name.to_owned(), t.to_owned()).is_none(),
                        "TYPE twice: {line}"
                    );
                }
                "HELP" => {
                    out.help
                        .insert(name.to_owned(), value.unwrap_or("").to_owned());
                }
                "UNIT" => {
                    let unit = value.unwrap_or_else(|| panic!("UNIT without unit: {line}"));
                    assert!(
                        name.ends_with(&format!("_{unit}")),
                        "family name must end with its unit: {line}"
                    );
                }
                _ => panic!("unknown metadata: {line}"),
            }
            continue;
        }
        out.samples.push(parse_sample(line));
    }
    for sample in &out.samples {
        let family = out
            .types
            .keys()
            .filter(|f| sample.name.starts_with(f.as_str()))
            .max_by_key(|f| f.len())
            .unwrap_or_else(|| panic!("sample without a TYPE: {}", sample.name));
        let suffix = &sample.name[family.len()..];
        let allowed: &[&str] = match out.types[family].as_str() {
            "counter" => &["_total", "_created"],
            "gauge" => &[""],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            "info" => &["_info"],
            _ => &["", "_total", "_bucket", "_count", "_sum"],
        };
        assert!(
            allowed.contains(&suffix),
            "sample {} does not fit its family type",
            sample.name
        );
    }
    check_histograms(&out);
    out
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("sample without value: {line}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => {
            let body = rest
                .strip_suffix('}')
                .unwrap_or_else(|| panic!("unclosed labels: {line}"));
            (name, parse_labels(body, line))
        }
        None => (series, BTreeMap::new()),
    };
    assert!(valid_name(name), "bad sample name: {line}");
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

fn parse_labels(body: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label: {line}"));
        assert!(valid_name(key), "bad label name: {line}");
        let end = after
            .find('"')
            .unwrap_or_else(|| panic!("unterminated label value: {line}"));
        labels.insert(key.to_owned(), after[..end].to_owned());
        rest = after[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&after[end + 1..]);
    }
    labels
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Buckets are cumulative, end at +Inf, and the +Inf bucket equals _count.
fn check_histograms(exposition: &Exposition) {
    for (family, kind) in &exposition.types {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for sample in exposition
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let mut labels = sample.labels.clone();
            let le = labels.remove("le").expect("bucket without le");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            series.entry(labels).or_default().push((le, sample.value));
        }
        for (labels, buckets) in series {
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{family} buckets not cumulative"
            );
            let (last_le, last) = *buckets.last().unwrap();
            assert!(last_le.is_infinite(), "{family} lacks a +Inf bucket");
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(
                last,
                exposition.value(&format!("{family}_count"), &labels),
                "{family} +Inf != count"
            );
        }
    }
}
